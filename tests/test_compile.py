"""--compile changes speed, not results: the compiled and eager `update()` of a script's `build_agent` take the same
parameters to the same values on a fixed seed (CPU; inductor generates C++ here, Triton on a GPU)."""

import sys

import pytest
import torch

from conftest import ROOT, load_script

sys.path.insert(0, ROOT)
from benchmark.speed import fill_replay  # noqa: E402

UPDATES = 3


def train(module, compile: bool):
    args = module.Args(env_id="Pong", encoder="nature", num_experts=2, batch_size=8, buffer_size=400,
                       compile=compile, cuda=False)
    torch.manual_seed(0)
    agent = module.build_agent(args, 6, torch.device("cpu"))
    fill_replay(agent.rb, 300, 6)
    initial = {k: v.detach().clone() for k, v in agent.q_network.state_dict().items()}
    losses = [agent.update()[0] for _ in range(UPDATES)]
    return torch.stack(losses), initial, {k: v.detach().clone() for k, v in agent.q_network.state_dict().items()}


# full Rainbow: the most the compiled step holds (C51, noisy nets drawing noise inside it, importance weights from
# the sum tree); the other scripts compile the same train_step pattern (each CPU compile costs 40-80 s of CI time).
# fallback_random makes inductor draw the noise with eager's generator.
@pytest.mark.parametrize("script", ["rainbow_softmoe"])
def test_compiled_update_matches_eager(script):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    module = load_script(script)
    eager_losses, initial, eager = train(module, False)
    with inductor_config.patch(fallback_random=True):
        compiled_losses, _, compiled = train(module, True)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
    # the updates did something: a comparison of untouched parameters would pass for any update
    changed = [n for n in eager if initial[n].is_floating_point() and not torch.equal(initial[n], eager[n])]
    assert len(changed) > len(eager) // 2, changed
