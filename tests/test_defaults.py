"""The paper's defaults for DQN, Rainbow and CQL (Tables 2-3, SPEC §4) and the DQN loss on a hand-computed batch.
(DER/DrQ(ε) defaults: tests/test_atari100k.py.)"""

import pytest
import torch

from conftest import load_script

COMMON = dict(learning_rate=6.25e-5, adam_eps=1.5e-4, learning_starts=20_000, replay_ratio=0.25, gamma=0.99,
              batch_size=32, buffer_size=1_000_000, target_network_frequency=8000, eval_epsilon=0.001,
              encoder="impala", moe_type="softmoe", num_experts=8, num_envs=1, total_timesteps=50_000_000,
              iteration_steps=250_000, tokenization="perconv", expert_hidden=512, expert_variant="regular")


@pytest.mark.parametrize("script,own", [
    ("dqn_softmoe", dict(n_step=1, loss="mse", start_e=1.0, end_e=0.01, exploration_steps=250_000)),
    ("rainbow_softmoe", dict(n_step=3, num_atoms=51, v_min=-10.0, v_max=10.0, noisy=True, noisy_epsilon=0.0,
                             dueling=True, double_q=True, prioritized=True)),
])
def test_online_defaults_are_the_papers(script, own):
    """200 iterations of 250k agent steps (200M frames), Impala, Soft MoE with 8 experts, Table 2's optimiser."""
    args = load_script(script).Args()
    assert {k: getattr(args, k) for k in {**COMMON, **own}} == {**COMMON, **own}
    assert args.total_timesteps // args.iteration_steps == 200


def test_offline_defaults_are_the_papers():
    """Table 3: CQL and CQL+C51, alpha 0.1, 200 iterations x 62,500 gradient steps, evaluation epsilon 0.001."""
    cql = load_script("cql_softmoe")
    args = cql.Args()
    assert (args.cql_alpha, args.num_iterations, args.gradient_steps_per_iteration, args.batch_size, args.gamma,
            args.eval_epsilon, args.agent, args.data_fraction) == (0.1, 200, 62_500, 32, 0.99, 0.001, "cql", 0.05)
    fields = ["learning_rate", "adam_eps", "n_step", "target_update_period"]
    values = {agent: [getattr(cql.with_agent_defaults(cql.Args(agent=agent)), k) for k in fields]
              for agent in ("cql", "cql-c51")}
    assert values == {"cql": [5e-5, 3.125e-4, 1, 2000], "cql-c51": [6.25e-5, 1.5e-4, 3, 100]}
    # a flag given by the user wins over the agent's default
    assert cql.with_agent_defaults(cql.Args(agent="cql-c51", n_step=5)).n_step == 5


class TableQ(torch.nn.Module):
    """Q-values read from a table by the state's first pixel, with the (q, info) interface of the scripts."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, x, return_info=False):
        q = self.table[x[:, 0, 0, 0].long()]
        return (q, {}) if return_info else q


def test_dqn_loss_by_hand():
    """MSE to r + discount * max_a Q_target(s', a), without double-Q (Table 2; Dopamine's DQN)."""
    dqn = load_script("dqn_softmoe")
    online = TableQ([[1.0, 2.0], [0.0, -1.0]])
    target = TableQ([[3.0, 5.0], [4.0, -2.0]])
    state = lambda i: torch.full((1, 4, 84, 84), i, dtype=torch.uint8)
    states = torch.cat([state(0), state(1)])
    next_states = torch.cat([state(1), state(0)])  # target maxima 4 and 5 (the online network would pick 0 and 1)
    actions, returns, discounts = torch.tensor([1, 0]), torch.tensor([1.0, -1.0]), torch.tensor([0.99, 0.0])
    td_loss, aux_loss, q_mean = dqn.dqn_loss(online, target, (states, actions, returns, discounts, next_states))
    # targets 1 + 0.99 * 4 = 4.96 and -1 (terminal); taken Q 2 and 0
    assert td_loss.item() == pytest.approx(((2 - 4.96) ** 2 + (0 + 1) ** 2) / 2)
    assert q_mean.item() == pytest.approx(1.0) and aux_loss.item() == 0.0
    huber, _, _ = dqn.dqn_loss(online, target, (states, actions, returns, discounts, next_states), "huber")
    assert huber.item() == pytest.approx(((2.96 - 0.5) + 0.5) / 2)
    td_loss.backward()
    torch.testing.assert_close(online.table.grad, torch.tensor([[0.0, 2 - 4.96], [1.0, 0.0]]))  # d mean / d q
    assert target.table.grad is None  # no gradient through the target
