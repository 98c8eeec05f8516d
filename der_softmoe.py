"""DER (data-efficient Rainbow) on Atari 100k with a Soft MoE (or Top1-MoE, or a widened dense layer) as its
penultimate layer.

Obando-Ceron, Sokar, Willi et al., "Mixtures of Experts Unlock Parameter Scaling for Deep RL", ICML 2024: the DER
curves of §5.2, Figures 12 (8 experts) and 16 (4 experts), on the Atari 100k protocol (no sticky actions, up to 30
no-ops, a life loss is terminal for learning only). Van Hasselt et al. (2019)'s Rainbow for 100k agent steps: 10-step
returns, one update per step after 1,600 steps, target update every 2,000 steps; evaluated on 100 episodes.

    python der_softmoe.py --env-id Breakout --num-experts 8
    python der_softmoe.py --env-id Pong --num-experts 4 --total-timesteps 12500000 --eval-every 250000  # Fig. 16
"""

import collections
import concurrent.futures
import contextlib
import copy
import difflib
import fcntl
import glob
import gzip
import json
import math
import os
import random
import re
import resource
import signal
import sys
import tempfile
import time
import types
import zlib
from dataclasses import dataclass
from typing import Literal

import ale_py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from ale_py.vector_env import AtariVectorEnv
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory's name)"""
    seed: int = 1
    """seed of numpy, torch (network init and noise), the replay sampler and the environments"""
    torch_deterministic: bool = True
    """make cuDNN deterministic (`torch.backends.cudnn.deterministic`; CPU runs are reproducible either way)"""
    cuda: bool = True
    """use CUDA when it is available (networks, replay memory, sum tree and sampling live on the GPU; see --gpu-replay-fraction)"""
    gpu_replay_fraction: float | None = None
    """share of the replay's frames kept on the GPU, the rest in page-locked host memory (default: all of them if they fit with a GiB to spare, else as many as fit; SPEC §5)"""
    compile: bool = False
    """compile the training step, acting and the replay's sampling with `torch.compile` (fewer GPU kernel launches)"""
    compile_mode: Literal["default", "reduce-overhead"] = "default"
    """with --compile: reduce-overhead captures the training step and acting in CUDA graphs and replays them (GPU only; not yet measured)"""
    tf32: bool = False
    """on an NVIDIA GPU (Ampere or newer): TF32 matmuls and convolutions, faster, 10-bit mantissa (off: exact float32)"""
    lagged_actor: bool = False
    """act with a copy of the network refreshed before each round of updates, on a CUDA stream of its own: learning hides behind acting (not the paper's: actions lag one round)"""
    runs_dir: str = "runs"
    """directory under which `{game}__{exp_name}__{seed}__{time}` run directories are created"""

    # environment (Atari 100k protocol, SPEC §1)
    env_id: str = "Breakout"
    """the game: `Breakout`, `breakout`, `ALE/Breakout-v5` and `BreakoutNoFrameskip-v4` all work"""
    num_envs: int = 1
    """parallel environments in one ale-py `AtariVectorEnv` (the paper uses 1); the replay ratio is kept"""
    total_timesteps: int = 100_000
    """agent steps over all environments (1 agent step = 4 frames; Atari 100k; 12.5M = the paper's 50M-frame runs)"""
    iteration_steps: int = 10_000
    """agent steps per iteration: `charts/iteration_return` is the mean training return of each one (Dopamine's DER)"""

    # algorithm (Table 1 of the paper, Dopamine's DER.gin)
    learning_rate: float = 1e-4
    """Adam's learning rate"""
    adam_eps: float = 1.5e-4
    """Adam's epsilon"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions (one 84x84 frame each); a run allocates no more than it can write (`replay_slots`)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 10
    """update horizon: n-step returns are built when sampling"""
    batch_size: int = 32
    """transitions per gradient update"""
    replay_ratio: float = 1.0
    """gradient updates per agent step (DER: one update every step)"""
    target_network_frequency: int = 2_000
    """agent steps between target network updates"""
    learning_starts: int = 1_600
    """replay slots written before learning starts (minimum replay history): agent steps, plus one slot per episode for its reset step"""
    num_atoms: int = 51
    """atoms of the C51 return distribution"""
    v_min: float = -10.0
    """smallest return of the C51 support"""
    v_max: float = 10.0
    """largest return of the C51 support"""
    noisy: bool = True
    """noisy nets in the heads and, with an MoE, in each expert's first layer; they explore (see --noisy-epsilon)"""
    noisy_epsilon: float = 0.0
    """with noisy nets: a constant training epsilon on top of the noise (0: the noise alone; the official code and Table 1: 0.01)"""
    dueling: bool = True
    """dueling head: per atom, value + advantage - mean advantage over actions"""
    double_q: bool = True
    """double-Q: the online network picks the next action, the target network gives its return distribution"""
    prioritized: bool = True
    """prioritized replay (priority sqrt(loss), importance weights 1/sqrt(P)); --no-prioritized samples uniformly"""
    start_e: float = 1.0
    """with --no-noisy only: exploration epsilon during the warm-up and at its end"""
    end_e: float = 0.01
    """with --no-noisy only: final exploration epsilon"""
    exploration_steps: int = 2_000
    """with --no-noisy only: agent steps over which epsilon decays linearly, counted after `learning_starts`"""

    # network and mixture of experts (SPEC §2-3)
    encoder: Literal["impala", "nature"] = "impala"
    """convolutional encoder: Impala ResNet (the paper's default) or the Nature CNN (Figure 7)"""
    encoder_scale: int = 1
    """width multiplier of the Impala encoder's channels (16, 32, 32)"""
    impala_filter_size: Literal[3, 4, 6] = 3
    """convolution filter size of the Impala encoder (Figure 18 uses 4 and 6)"""
    moe_type: Literal["softmoe", "top1", "baseline"] = "softmoe"
    """penultimate layer: Soft MoE, Top1-MoE, or the dense baseline widened to 512 x num_experts units"""
    num_experts: int = 8
    """number of experts (for `baseline`: the width multiplier of its dense layer; 1 is plain Rainbow)"""
    tokenization: Literal["perconv", "perfeat", "persamp"] = "perconv"
    """how the encoder output becomes tokens (Figure 6): per position, per feature map, or one per sample"""
    expert_hidden: int = 512
    """hidden units of each expert (and of the baseline's dense layer before widening)"""
    expert_hidden_divide: bool = False
    """divide each expert's hidden units by the number of experts (Figure 5)"""
    random_phi: bool = False
    """Soft MoE: redraw the slot parameters Phi from N(0, 1) at every forward pass instead of learning them (Figure 8)"""
    moe_l2_norm: bool = False
    """Soft MoE: l2-normalise tokens and Phi, with a learned scale (Puigcerver et al. 2023; Figure 13)"""
    load_balancing_coef: float = 0.0
    """Top1-MoE: weight of the importance and load losses of Ruiz et al. 2021 (Figure 9 uses 1.0)"""
    expert_variant: Literal["regular", "big", "all"] = "regular"
    """Soft MoE placement (Figure 13): penultimate layer, whole network per expert, or one per layer (Impala: per stack); shared C51 head"""

    # logging, evaluation and outputs
    log_every: int = 1_000
    """agent steps between loss/SPS scalars in TensorBoard"""
    metrics_every: int = 10_000
    """agent steps between the analysis metrics of Figure 10 (dormant neurons, srank, eNTK, routing); 0 = never"""
    print_every: int = 10_000
    """agent steps between progress lines when stdout is not a terminal"""
    save_replay: str = ""
    """write the final replay to `{dir}/{Game}/{run}/replay_logs/` in the DQN Replay Dataset layout, for cql_softmoe.py"""
    save_model: bool = False
    """save the final network to `{run_dir}/model.pt`"""
    eval_episodes: int = 100
    """episodes of each evaluation, all at once in one vector env, each to its game over (0 = no evaluation)"""
    eval_every: int = 0
    """agent steps between evaluations during training (0 = only after training; the 50M-frame runs use 250,000)"""
    eval_epsilon: float = 0.001
    """exploration epsilon during evaluation (noisy nets off)"""

    # checkpoints (long runs, preemption)
    checkpoint_every: int = 0
    """agent steps between complete checkpoints in `{run_dir}/checkpoints/` (0 = only when stopped by SIGTERM/SIGUSR1/SIGUSR2)"""
    checkpoint_keep: int = 1
    """how many of the newest checkpoints to keep"""
    checkpoint_replay: bool = True
    """include the replay memory (0.71 GB for a 100k run); without it a resumed run refills it before learning again"""
    resume: str = ""
    """continue a run: a checkpoint file, a run directory, or `auto` (the newest unfinished run of this game, exp_name and seed)"""


# === shared: environment ===
def resolve_rom(env_id: str) -> str:
    """Map `Breakout`, `breakout`, `ALE/Breakout-v5`, `BreakoutNoFrameskip-v4` or `space_invaders` to a ROM id."""
    name = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", env_id.split("/")[-1])
    roms = {rom.replace("_", ""): rom for rom in ale_py.roms.get_all_rom_ids()}
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key in roms:
        return roms[key]
    close = [roms[k] for k in difflib.get_close_matches(key, list(roms), n=4, cutoff=0.5)]
    hint = f"closest ROM ids: {', '.join(close)}" if close else "see `ale_py.roms.get_all_rom_ids()`"
    raise ValueError(f"unknown game {env_id!r}; {hint}")


def game_name(rom: str) -> str:
    """`space_invaders` -> `SpaceInvaders`, the name used in run directories and score tables."""
    return "".join(part.capitalize() for part in rom.split("_"))


def make_env(rom: str, num_envs: int, protocol: str, max_episode_frames: int = 108_000) -> AtariVectorEnv:
    """ale-py's C++ vector env, every setting explicit: its defaults are neither protocol (SPEC §1)."""
    if num_envs < 1:  # ale-py's AtariVectorEnv crashes the interpreter with none
        raise ValueError(f"an Atari vector env needs at least one env, got {num_envs}")
    atari100k = protocol == "atari100k"
    return AtariVectorEnv(
        rom,
        num_envs,
        repeat_action_probability=0.0 if atari100k else 0.25,  # sticky actions (Machado et al. 2018)
        noop_max=0,  # ale-py's no-ops are single frames; the Atari 100k loops play Dopamine's agent steps (NoopStarts)
        use_fire_reset=False,
        reward_clipping=False,  # logged returns are game scores; the learner clips
        episodic_life=False,  # True would restart the whole game at every life loss
        life_loss_info=False,  # life losses are read from info["lives"] where the protocol needs them
        max_num_frames_per_episode=max_episode_frames,  # 108k frames = 27k agent steps, a truncation
        frameskip=4,
        maxpool=True,
        stack_num=4,
        img_height=84,
        img_width=84,
        grayscale=True,
        full_action_space=False,
        autoreset_mode="NextStep",  # the step after a game over returns the first frame of the next one
    )
# === end shared ===


# === shared: atari100k ===
# random and human scores of reference/atari_scores.csv, by ROM id, for the human-normalised score (SPEC §8); games
# without a human score (AirRaid, Carnival, Defender, ElevatorAction, JourneyEscape, Pooyan, Surround) are left out
ATARI_SCORES = {
    "alien": (227.8, 7127.7), "amidar": (5.8, 1719.5), "assault": (222.4, 742.0), "asterix": (210.0, 8503.3),
    "asteroids": (719.1, 47388.7), "atlantis": (12850.0, 29028.1), "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5), "beam_rider": (363.9, 16926.5), "berzerk": (123.7, 2630.4),
    "bowling": (23.1, 160.7), "boxing": (0.1, 12.1), "breakout": (1.7, 30.5), "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8), "crazy_climber": (10780.5, 35829.4), "demon_attack": (152.1, 1971.0),
    "double_dunk": (-18.6, -16.4), "enduro": (0.0, 860.5), "fishing_derby": (-91.7, -38.7), "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7), "gopher": (257.6, 2412.5), "gravitar": (173.0, 3351.4), "hero": (1027.0, 30826.4),
    "ice_hockey": (-11.2, 0.9), "jamesbond": (29.0, 302.8), "kangaroo": (52.0, 3035.0), "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3), "montezuma_revenge": (0.0, 4753.3), "ms_pacman": (307.3, 6951.6),
    "name_this_game": (2292.3, 8049.0), "phoenix": (761.4, 7242.6), "pitfall": (-229.4, 6463.7), "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3), "qbert": (163.9, 13455.0), "riverraid": (1338.5, 17118.0),
    "road_runner": (11.5, 7845.0), "robotank": (2.2, 11.9), "seaquest": (68.4, 42054.7), "skiing": (-17098.1, -4336.9),
    "solaris": (1236.3, 12326.7), "space_invaders": (148.0, 1668.7), "star_gunner": (664.0, 10250.0),
    "tennis": (-23.8, -8.3), "time_pilot": (3568.0, 5229.2), "tutankham": (11.4, 167.6), "up_n_down": (533.4, 11693.2),
    "venture": (0.0, 1187.5), "video_pinball": (0.0, 17667.9), "wizard_of_wor": (563.5, 4756.5),
    "yars_revenge": (3092.9, 54576.9), "zaxxon": (32.5, 9173.3),
}


def human_normalized_score(rom: str, scores) -> float | None:
    """Mean over episodes of (score - random) / (human - random); None for a game without a human score."""
    if rom not in ATARI_SCORES or len(scores) == 0:
        return None
    random_score, human_score = ATARI_SCORES[rom]
    return float(np.mean([(score - random_score) / (human_score - random_score) for score in scores]))


class LifeLoss:
    """Atari 100k: losing a life is terminal for learning only (SPEC §1), read from `info["lives"]` decreasing.

    The game goes on, but as Dopamine's runner ends and begins an agent episode at each life loss (zeroing the agent's
    state), the acting stack restarts with the next life: `acting(obs)` zeroes the env's frames of earlier lives, so
    acting sees exactly the stacks the replay rebuilds (it zeroes frames before a `terminal` or `last` slot).
    """

    def __init__(self, lives: np.ndarray, stack: int = 4):
        self.lives = np.array(lives, dtype=np.int64)  # lives after the last step
        self.frames = np.ones(len(self.lives), dtype=np.int64)  # frames of the current life in the next acting stack
        self.stack = stack

    def step(self, lives: np.ndarray, terminations: np.ndarray, was_done: np.ndarray) -> np.ndarray:
        """After a vector-env step: returns `terminal` for the replay (a game over, or a life lost in this step; the
        lives a reset step reports are the next game's, not a loss) and counts the frames of the next stack's life."""
        lost = (np.asarray(lives) < self.lives) & ~was_done
        terminal = terminations | lost
        self.frames = np.where(terminal | was_done, 1, np.minimum(self.frames + 1, self.stack))
        self.lives = np.array(lives, dtype=np.int64)
        return terminal

    def acting(self, obs: np.ndarray) -> np.ndarray:
        """(N, stack, 84, 84) observations with the frames of earlier lives and episodes set to zero."""
        keep = np.arange(self.stack) >= self.stack - self.frames[:, None]  # (N, stack): the newest `frames` frames
        return obs * keep[:, :, None, None].astype(obs.dtype)

    def state_dict(self) -> dict:
        return {"lives": torch.as_tensor(self.lives), "frames": torch.as_tensor(self.frames)}

    def load_state_dict(self, state: dict) -> None:
        self.lives, self.frames = state["lives"].numpy().copy(), state["frames"].numpy().copy()


NOOP_MAX = 30  # Dopamine's DataEfficientAtariRunner: max_noops


class NoopStarts:
    """Atari 100k no-op starts (SPEC §1) as Dopamine's runner plays them: after its reset a game first plays
    k ~ U{0, ..., 29} NOOP agent steps of 4 max-pooled frames (ale-py's own `noop_max` counts single frames: a quarter
    of that span). They are no agent steps: not counted, not in the game's return or length, never learned from (their
    replay slots are final-observation slots), and the game's first acting stack holds its first frame after them."""

    def __init__(self, num_envs: int, noop_max: int = NOOP_MAX):
        self.left = np.zeros(num_envs, dtype=np.int64)  # no-op steps each env plays before the agent acts
        self.noop_max = noop_max
        self.slots = 0  # replay slots written at no-op steps: they do not count towards --learning-starts

    def start(self, games: np.ndarray, rng: np.random.Generator) -> None:
        """The envs of mask `games` begin a game (their reset is done): draw how many no-ops each plays first."""
        self.left[games] = rng.integers(0, self.noop_max, size=int(np.sum(games)))

    def step(self) -> np.ndarray:
        """Before a vector step: the mask of envs that play a no-op in it (action 0, NOOP in every minimal set)."""
        nooping = self.left > 0
        self.left -= nooping
        return nooping

    def state_dict(self) -> dict:
        return {"left": torch.as_tensor(self.left), "slots": self.slots}

    def load_state_dict(self, state: dict) -> None:
        self.left, self.slots = state["left"].numpy().copy(), int(state["slots"])
# === end shared ===


# === shared: encoders ===
def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one axis: output size ceil(in/stride); an odd total puts the extra pixel last."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """`x` padded explicitly for a 'SAME' window (a copy: the layers below avoid it where they can)."""
    (top, bottom), (left, right) = (same_pads(size, kernel, stride) for size in x.shape[-2:])
    return F.pad(x, [left, right, top, bottom], value=value)


def same_max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Max-pool with 'SAME' padding that never wins the max. Odd kernels: PyTorch pads the leading side itself and
    `ceil_mode` adds the window over the extra last pixel, so x is not copied (one kernel less per call on a GPU)."""
    if kernel % 2 == 0:
        return F.max_pool2d(same_pad(x, kernel, stride, value=-math.inf), kernel, stride)
    padding = tuple(same_pads(size, kernel, stride)[0] for size in x.shape[-2:])
    return F.max_pool2d(x, kernel, stride, padding, ceil_mode=True)


def xavier_uniform_(weight: torch.Tensor, groups: int = 1) -> None:
    """Glorot-uniform with fans counted inside one group, so each of `groups` experts is initialised as Flax would."""
    receptive = weight[0, 0].numel()
    bound = math.sqrt(6.0 / (weight.shape[1] * receptive + weight.shape[0] // groups * receptive))
    nn.init.uniform_(weight, -bound, bound)


def lecun_normal_(weight: torch.Tensor) -> None:
    """Flax's default kernel init: truncated normal (+-2 std) whose std is 1/sqrt(fan_in) after truncation."""
    std = 1.0 / math.sqrt(weight[0].numel()) / 0.87962566103423978
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


class SameConv2d(nn.Conv2d):
    """Conv2d with TF-'SAME' padding and the official initialisation (zero bias)."""

    def __init__(self, in_channels, out_channels, kernel, stride=1, groups=1, init="xavier"):
        super().__init__(in_channels, out_channels, kernel, stride, padding=0, groups=groups)
        if init == "xavier":
            xavier_uniform_(self.weight, groups)
        else:
            lecun_normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        (top, bottom), (left, right) = (same_pads(size, self.kernel_size[0], self.stride[0]) for size in x.shape[-2:])
        if self.stride == (1, 1) and top == bottom and left == right:  # pads itself: no padded copy (Impala's convs)
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        return super().forward(F.pad(x, [left, right, top, bottom]))


class ImpalaStack(nn.Module):
    """conv -> 3x3/2 max-pool -> 2 residual blocks [ReLU, conv, ReLU, conv] + input (Espeholt et al. 2018)."""

    def __init__(self, in_channels, channels, filter_size, groups=1):
        super().__init__()
        self.conv = SameConv2d(in_channels, channels, filter_size, groups=groups)
        self.blocks = nn.ModuleList(
            nn.ModuleList(SameConv2d(channels, channels, filter_size, groups=groups, init="lecun") for _ in range(2))
            for _ in range(2)
        )

    def forward(self, x):
        x = self.conv(x)
        x = same_max_pool(x, 3, 2)
        for conv_a, conv_b in self.blocks:
            x = x + conv_b(F.relu(conv_a(F.relu(x))))
        return x


class ImpalaEncoder(nn.Module):
    """Impala ResNet of the official code: channels (16, 32, 32) x scale, 84 -> 42 -> 21 -> 11 (SPEC §2).

    `groups` > 1 runs that many independent encoders side by side (grouped convolutions), one per expert.
    """

    def __init__(self, in_channels=4, scale=1, filter_size=3, groups=1):
        super().__init__()
        channels = [c * scale * groups for c in (16, 32, 32)]
        inputs = [in_channels * groups] + channels[:-1]
        self.stages = nn.ModuleList(ImpalaStack(i, c, filter_size, groups) for i, c in zip(inputs, channels))
        self.out_channels = channels[-1] // groups

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[index](x)
        return F.relu(x) if index == len(self.stages) - 1 else x  # a ReLU after the last stack

    def forward(self, x):
        for index in range(len(self.stages)):
            x = self.stage(index, x)
        return x


class NatureEncoder(nn.Module):
    """Nature CNN (Mnih et al. 2015) with TF-'SAME' padding: 84 -> 21 -> 11 -> 11, 11x11x64 out (SPEC §2)."""

    def __init__(self, in_channels=4, groups=1):
        super().__init__()
        specs = [(in_channels, 32, 8, 4), (32, 64, 4, 2), (64, 64, 3, 1)]
        self.stages = nn.ModuleList(SameConv2d(i * groups, o * groups, k, s, groups) for i, o, k, s in specs)
        self.out_channels = 64

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.stages[index](x))

    def forward(self, x):
        for index in range(len(self.stages)):
            x = self.stage(index, x)
        return x


def make_encoder(name: str, scale: int, filter_size: int, groups: int = 1) -> nn.Module:
    if name == "impala":
        return ImpalaEncoder(4, scale, filter_size, groups)
    return NatureEncoder(4, groups)
# === end shared ===


# === shared: tokenize ===
def tokenize(x: torch.Tensor, tokenization: str) -> torch.Tensor:
    """Encoder output (B, C, H, W) -> tokens (B, m, d) per sample (§3, Figure 3); tokens never mix samples."""
    if tokenization == "perconv":
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C): one token per position
    if tokenization == "perfeat":
        return x.flatten(2)  # (B, C, H, W) -> (B, C, H*W): one token per feature map
    return x.flatten(1).unsqueeze(1)  # (B, C, H, W) -> (B, 1, C*H*W): the whole sample is one token


def num_tokens_and_dim(channels: int, height: int, width: int, tokenization: str) -> tuple[int, int]:
    """(m, d) that `tokenize` produces for an encoder output of that shape."""
    return {"perconv": (height * width, channels), "perfeat": (channels, height * width)}.get(
        tokenization, (1, channels * height * width)
    )
# === end shared ===


# === shared: Experts ===
class Experts(nn.Module):
    """`num_experts` independent MLPs d -> hidden -> ReLU -> d, all run at once with batched matmuls.

    Input (B, n, p, d): expert i gets its p slots. Returns the outputs and the hidden activations.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        bound = math.sqrt(6.0 / (dim + hidden))  # Glorot-uniform per expert, as the official ExpertModel
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(torch.einsum("bnpd,ndh->bnph", x, self.w1) + self.b1[:, None])
        return torch.einsum("bnph,nhd->bnpd", hidden, self.w2) + self.b2[:, None], hidden
# === end shared ===


# === shared: noisy ===
def scaled_noise(*shape, device=None, dtype=None) -> torch.Tensor:
    """f(e) = sign(e) sqrt(|e|) of standard normal draws: the factorised noise of Fortunato et al. (2018)."""
    noise = torch.randn(*shape, device=device, dtype=dtype)
    return noise.sign() * noise.abs().sqrt()


class NoisyLinear(nn.Module):
    """Factorised Gaussian noisy dense layer (Fortunato et al. 2018) with Dopamine's NoisyNetwork init (SPEC §4):
    mu ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and sigma = 0.1/sqrt(fan_in), for the weight and the bias.

    In training mode each sample draws its own noise (Dopamine vmaps the loss with one key per sample), computed
    without per-sample weights: y = x mu_W + mu_b + ((x f(e_in)) sigma_W + sigma_b) f(e_out). While `shared_noise`
    holds a draw (`share_noise`, for the C51 target) every sample uses it. In eval mode: the means.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), 0.1 * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), 0.1 * bound))
        self.shared_noise = None  # (f(e_in), f(e_out)) for the whole batch while `share_noise` is on

    def draw_shared_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        out_features, in_features = self.weight_mu.shape
        like = dict(device=self.weight_mu.device, dtype=self.weight_mu.dtype)
        return scaled_noise(1, in_features, **like), scaled_noise(1, out_features, **like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_mu, self.bias_mu)
        if not self.training:
            return y
        if self.shared_noise is None:
            eps_in = scaled_noise(x.shape[0], x.shape[1], device=x.device, dtype=x.dtype)  # (B, in)
            eps_out = scaled_noise(x.shape[0], y.shape[1], device=x.device, dtype=x.dtype)  # (B, out)
        else:
            eps_in, eps_out = self.shared_noise  # (1, in), (1, out)
        return y + F.linear(x * eps_in, self.weight_sigma, self.bias_sigma) * eps_out


class NoisyGroupedLinear(nn.Module):
    """`groups` independent noisy dense layers on (B, groups, ..., in), initialised as `NoisyLinear`.

    Noise is drawn per sample and shared by the groups and the middle axes: Dopamine gives every expert (and each of
    its slots) the same key, `ExpertModel.rng_key`. `shared_noise` as in `NoisyLinear`.
    """

    def __init__(self, groups: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((groups, in_features, out_features), 0.1 * bound))
        self.bias_mu = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((groups, out_features), 0.1 * bound))
        self.shared_noise = None

    def draw_shared_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, in_features, out_features = self.weight_mu.shape
        like = dict(device=self.weight_mu.device, dtype=self.weight_mu.dtype)
        return scaled_noise(1, 1, 1, in_features, **like), scaled_noise(1, 1, 1, out_features, **like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], shape[1], -1, shape[-1])  # (B, g, ..., in) -> (B, g, P, in)
        y = torch.einsum("bgpi,gio->bgpo", x, self.weight_mu) + self.bias_mu[:, None]
        if self.training:
            if self.shared_noise is None:  # (B, 1, 1, in), (B, 1, 1, out)
                eps_in = scaled_noise(shape[0], 1, 1, x.shape[-1], device=x.device, dtype=x.dtype)
                eps_out = scaled_noise(shape[0], 1, 1, y.shape[-1], device=x.device, dtype=x.dtype)
            else:
                eps_in, eps_out = self.shared_noise
            y = y + (torch.einsum("bgpi,gio->bgpo", x * eps_in, self.weight_sigma) + self.bias_sigma[:, None]) * eps_out
        return y.reshape(*shape[:-1], -1)


class NoisyExperts(nn.Module):
    """`Experts` whose first layer is noisy (Rainbow with an MoE, SPEC §4): noise per sample, the same for every expert
    and slot (as Dopamine); the second layer is the plain Glorot-uniform batched linear of `Experts`.

    Input (B, n, p, d). Returns the outputs and the hidden activations.
    """

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.layer1 = NoisyGroupedLinear(num_experts, dim, hidden)
        bound = math.sqrt(6.0 / (dim + hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.layer1(x))
        return torch.einsum("bnph,nhd->bnpd", hidden, self.w2) + self.b2[:, None], hidden
# === end shared ===


# === shared: SoftMoE ===
def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    return x / (x.norm(dim=dim, keepdim=True) + eps)


class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al. 2023) as written in the paper's §2.2.

    Logits L = X Phi (m x n*p); dispatch D = softmax of L over the m tokens, combine C = softmax of L over all
    n*p slots; slot inputs D^T X go to the experts (p slots each), outputs Y = C Y~. Returns (Y, info).
    """

    def __init__(self, num_tokens, dim, num_experts, experts, l2_norm=False, random_phi=False):
        super().__init__()
        self.num_experts = num_experts
        self.slots_per_expert = math.ceil(num_tokens / num_experts)  # capacity factor 1: 121 tokens -> 16 slots for 8
        self.dim, self.l2_norm, self.random_phi = dim, l2_norm, random_phi
        self.experts = experts
        num_slots = num_experts * self.slots_per_expert
        if not random_phi:
            std = 1.0 / math.sqrt(num_experts * dim) / 0.87962566103423978  # lecun-normal over fan-in n*d
            self.phi = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim, num_slots), 0.0, std, -2 * std, 2 * std))
        if l2_norm:
            self.scale = nn.Parameter(torch.ones(1))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        batch, n, p = tokens.shape[0], self.num_experts, self.slots_per_expert
        if self.random_phi:  # Figure 8 (right): Phi ~ N(0, 1), never learned, redrawn at every call, one per sample
            phi = torch.randn(batch, self.dim, n * p, device=tokens.device, dtype=tokens.dtype)  # official: a key each
        else:
            phi = self.phi
        if self.l2_norm:
            logits = l2_normalize(tokens, -1) @ (self.scale * l2_normalize(phi, -2))
        else:
            logits = tokens @ phi  # (B, m, d) @ ([B,] d, n*p) -> (B, m, n*p)
        dispatch = logits.softmax(dim=1)  # each slot: a convex mix of the m tokens
        combine = logits.softmax(dim=2)  # each token: a convex mix of all n*p slot outputs
        slots = dispatch.transpose(1, 2) @ tokens  # (B, n*p, m) @ (B, m, d) -> (B, n*p, d), un-normalised X
        outputs, hidden = self.experts(slots.view(batch, n, p, -1))
        y = combine @ outputs.reshape(batch, n * p, -1)  # (B, m, n*p) @ (B, n*p, d) -> (B, m, d)
        expert_mass = combine.view(*combine.shape[:2], n, p).sum(-1)  # (B, m, n): each token's weight per expert
        return y, {"hidden": hidden, "hidden_mask": None, "expert_mass": expert_mass}
# === end shared ===


# === shared: Top1MoE ===
def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis (population std), as vmoe/Dopamine compute it."""
    return (x.std(-1, unbiased=False) / x.mean(-1)) ** 2


class Top1MoE(nn.Module):
    """Switch-style top-1 routing (Fedus et al. 2022): capacity ceil(m/n) tokens per expert per sample, filled in
    token order; overflow tokens output exactly zero, kept outputs are scaled by their gate probability.

    Static shapes only (one-hot positions from a cumsum), so it can be captured in a CUDA graph.
    """

    def __init__(self, num_tokens, dim, num_experts, experts, load_balancing=False):
        super().__init__()
        self.num_experts, self.capacity = num_experts, math.ceil(num_tokens / num_experts)
        self.router = nn.Linear(dim, num_experts, bias=False)
        lecun_normal_(self.router.weight)  # the official router is a Flax Dense with its default init
        self.experts = experts
        self.load_balancing = load_balancing

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        n, capacity = self.num_experts, self.capacity
        logits = self.router(tokens).float()  # (B, m, n), softmax in float32
        probs = logits.softmax(-1)
        gate, expert = probs.max(-1)  # (B, m)
        chosen = (expert[..., None] == torch.arange(n, device=tokens.device)).to(tokens.dtype)  # (B, m, n)
        position = ((chosen.cumsum(1) - 1) * chosen).sum(-1).long()  # place of each token in its expert's queue
        kept = position < capacity
        slot = (position[..., None] == torch.arange(capacity, device=tokens.device)) & kept[..., None]  # (B, m, c)
        dispatch = chosen[..., None] * slot[:, :, None, :].to(tokens.dtype)  # (B, m, n, c)
        expert_inputs = torch.einsum("bmnc,bmd->bncd", dispatch, tokens)
        outputs, hidden = self.experts(expert_inputs)
        y = torch.einsum("bmnc,bncd->bmd", dispatch, outputs) * gate[..., None].to(tokens.dtype)
        info = {"hidden": hidden, "hidden_mask": dispatch.sum(1), "expert_mass": chosen, "gate_probs": probs}
        info["dropped"] = 1.0 - kept.float().mean()
        if self.load_balancing:
            info["aux_loss"] = self.importance_loss(probs) + self.load_loss(logits)
        return y, info

    def importance_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """CV^2 over experts of the summed gate probabilities of a sample (Ruiz et al. 2021, eq. 7)."""
        return cv_squared(probs.sum(1)).mean()

    def load_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """CV^2 of each expert's probability of being selected under re-drawn noise of std 1/n (Ruiz et al. 2021)."""
        noise_std = 1.0 / self.num_experts
        threshold = (logits + noise_std * torch.randn_like(logits)).max(-1, keepdim=True).values
        p_selected = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)
        return cv_squared(p_selected.mean(1)).mean()
# === end shared ===


# === shared: PerSampSoftMoE ===
class PerSampSoftMoE(nn.Module):
    """Soft MoE on a single PerSamp token with one slot per expert, for the 'big' and 'all' variants (§5.3).

    With m = 1 the dispatch softmax is exactly 1, so every expert sees the whole input; the combine weights
    softmax_n(x Phi) mix the experts' outputs (B, n, ...), which the caller computes on that same input.
    """

    def __init__(self, in_features, num_experts, l2_norm=False, random_phi=False):
        super().__init__()
        self.in_features, self.num_experts, self.l2_norm, self.random_phi = in_features, num_experts, l2_norm, random_phi
        if not random_phi:
            std = 1.0 / math.sqrt(num_experts * in_features) / 0.87962566103423978
            self.phi = nn.Parameter(nn.init.trunc_normal_(torch.empty(in_features, num_experts), 0.0, std, -2 * std, 2 * std))
        if l2_norm:
            self.scale = nn.Parameter(torch.ones(1))

    def forward(self, token: torch.Tensor, expert_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.random_phi:  # as SoftMoE's: one Phi per sample
            phi = torch.randn(token.shape[0], self.in_features, self.num_experts, device=token.device, dtype=token.dtype)
        else:
            phi = self.phi
        if self.l2_norm:
            logits = (l2_normalize(token, -1).unsqueeze(-2) @ (self.scale * l2_normalize(phi, -2))).squeeze(-2)
        else:
            logits = (token.unsqueeze(-2) @ phi).squeeze(-2)  # (B, 1, D) @ ([B,] D, n) -> (B, n)
        combine = logits.softmax(-1)
        return torch.einsum("bn,bn...->b...", combine, expert_outputs), combine


class GroupedLinear(nn.Module):
    """`groups` independent dense layers applied to (B, groups, in) at once; Glorot-uniform, zero bias."""

    def __init__(self, groups, in_features, out_features):
        super().__init__()
        bound = math.sqrt(6.0 / (in_features + out_features))
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(groups, out_features))

    def forward(self, x):
        return torch.einsum("bgi,gio->bgo", x, self.weight) + self.bias
# === end shared ===


def xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    """A dense layer with the official init: Glorot-uniform weight, zero bias (Flax Dense with xavier_uniform)."""
    layer = nn.Linear(in_features, out_features)
    xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class QNetwork(nn.Module):
    """Encoder -> penultimate layer (baseline dense, Soft MoE or Top1-MoE) -> dueling C51 head (the official
    FullRainbowMoENetwork). With --noisy the heads are noisy, and so are the baseline's dense layer, the experts' first
    layer, or the big/all variants' dense copies.

    `forward(x)` takes uint8 frames (B, 4, 84, 84) and returns log-probabilities (B, A, atoms) over `support`
    (`expected_q` turns them into Q-values); with `return_info` also the head's input `features` and what the
    analysis metrics need (hidden activations, routing, auxiliary losses).
    """

    def __init__(self, args: Args, num_actions: int):
        super().__init__()
        self.args, n = args, args.num_experts
        self.register_buffer("support", torch.linspace(args.v_min, args.v_max, args.num_atoms))
        hidden = args.expert_hidden // n if args.expert_hidden_divide else args.expert_hidden
        channels = 32 * args.encoder_scale if args.encoder == "impala" else 64
        flat = channels * 11 * 11
        dense = NoisyLinear if args.noisy else xavier_linear  # Dopamine's feature_layer
        if args.expert_variant == "regular":
            self.encoder = make_encoder(args.encoder, args.encoder_scale, args.impala_filter_size)
            if args.moe_type == "baseline":  # widened by num_experts to match the MoE's parameters (Figure 1)
                self.dense = dense(flat, hidden * n)
                features = hidden * n
            else:
                m, d = num_tokens_and_dim(channels, 11, 11, args.tokenization)
                experts = (NoisyExperts if args.noisy else Experts)(n, d, hidden)  # experts' first layer noisy (SPEC §4)
                if args.moe_type == "softmoe":
                    self.moe = SoftMoE(m, d, n, experts, args.moe_l2_norm, args.random_phi)
                else:
                    self.moe = Top1MoE(m, d, n, experts, args.load_balancing_coef > 0)
                features = m * d  # no ReLU and no extra dense layer after the MoE (official code)
        else:  # 'big' and 'all' (§5.3): n networks side by side; Rainbow's final layer is shared, not an expert's
            self.encoder = make_encoder(args.encoder, args.encoder_scale, args.impala_filter_size, groups=n)
            self.dense = (NoisyGroupedLinear if args.noisy else GroupedLinear)(n, flat, hidden)
            moe = lambda size: PerSampSoftMoE(size, n, args.moe_l2_norm, args.random_phi)
            if args.expert_variant == "big":  # one Soft MoE routing the input frames to whole networks
                self.big_moe = moe(4 * 84 * 84)
            else:  # 'all': a Soft MoE at every layer but the last, each mixing n copies of that layer
                x, sizes = torch.zeros(1, 4 * n, 84, 84), []
                with torch.no_grad():
                    for i in range(len(self.encoder.stages)):
                        sizes.append(x[0].numel() // n)
                        x = self.encoder.stage(i, x)
                self.stage_moes = nn.ModuleList(moe(size) for size in sizes)
                self.dense_moe = moe(flat)
            features = hidden
        if args.dueling:  # value (atoms) and advantage (actions x atoms) streams (Wang et al. 2016)
            self.value = dense(features, args.num_atoms)
            self.advantage = dense(features, num_actions * args.num_atoms)
        else:
            self.head = dense(features, num_actions * args.num_atoms)

    def forward(self, x: torch.Tensor, return_info: bool = False):
        x = x.float() / 255.0
        batch, n, variant = x.shape[0], self.args.num_experts, self.args.expert_variant
        if variant == "regular":
            h = self.encoder(x)
            if self.args.moe_type == "baseline":
                features = F.relu(self.dense(h.flatten(1)))
                info = {"hidden": features[:, None, None], "hidden_mask": None}
            else:
                y, info = self.moe(tokenize(h, self.args.tokenization))
                features = y.flatten(1)
        elif variant == "big":
            h = self.encoder(x.repeat(1, n, 1, 1)).reshape(batch, n, -1)  # (B, n*C, 11, 11) -> (B, n, C*121)
            hidden = F.relu(self.dense(h))
            features, combine = self.big_moe(x.flatten(1), hidden)  # (B, n, h) mixed per sample -> (B, h)
        else:
            for i, stage_moe in enumerate(self.stage_moes):
                y = self.encoder.stage(i, x.repeat(1, n, 1, 1))  # n copies of layer i on the same input
                x, _ = stage_moe(x.flatten(1), y.reshape(batch, n, -1, *y.shape[-2:]))
            hidden = F.relu(self.dense(x.flatten(1).unsqueeze(1).expand(-1, n, -1)))
            features, combine = self.dense_moe(x.flatten(1), hidden)
        if variant != "regular":
            info = {"hidden": hidden[:, :, None], "hidden_mask": None, "expert_mass": combine[:, None]}
        if self.args.dueling:
            value = self.value(features).view(batch, 1, -1)
            advantage = self.advantage(features).view(batch, -1, value.shape[-1])  # (B, A, atoms)
            logits = value + advantage - advantage.mean(1, keepdim=True)
        else:
            logits = self.head(features).view(batch, -1, self.support.shape[0])
        log_probs = logits.log_softmax(-1)  # a distribution over the atoms per action
        if return_info:
            info["features"] = features
            return log_probs, info
        return log_probs

    def q_values(self, x: torch.Tensor) -> torch.Tensor:
        """Q-values (B, A): the means of the return distributions, what acting and evaluation maximise."""
        return expected_q(self(x), self.support)


# === shared: Actor ===
class Actor:
    """The agent's actions for a batch of observations (uint8 (N, 4, 84, 84) numpy): one host synchronisation per call.

    `policy(network, states)` returns the actions on the device. On a GPU the states go up and the actions come down
    through page-locked memory. With `lagged` (--lagged-actor) the actor acts with its own copy of the network, which
    `refresh()` updates just before each round of updates, on a CUDA stream of its own: acting never waits for the
    updates in flight, so on a GPU they run while the emulators step. The cost: actions never use the latest round
    (with one env and replay ratio 0.25, the parameters are 4 agent steps older; Dopamine acts with the newest).
    """

    def __init__(self, network: nn.Module, policy, lagged: bool = False, graphs: bool = False):
        self.source, self.policy, self.lagged = network, policy, lagged
        self.network = copy.deepcopy(network).requires_grad_(False) if lagged else network
        self.device = next(network.parameters()).device
        self.stream = torch.cuda.Stream(self.device) if lagged and self.device.type == "cuda" else None
        self.refreshed = None  # CUDA event: the last write of the actor's copy (made, refreshed, loaded) is done
        self.written()
        self.graphs = {} if graphs and self.device.type == "cuda" else None  # batch shape -> graph, its input, output

    def refresh(self) -> None:
        """Copy the network's parameters into the actor's (lagged only). On a GPU the copy is queued on the
        learner's stream, after the round before, and the actor's next call waits for it, not for what follows."""
        if not self.lagged:
            return
        with torch.no_grad():  # no wait for the actor's reads: each of its calls ends before it returns
            torch._foreach_copy_([*self.network.parameters(), *self.network.buffers()],
                                 [*self.source.parameters(), *self.source.buffers()])
        self.written()

    def written(self) -> None:
        """The actor's stream waits for what the learner's stream queued so far: the copy it will read."""
        if self.stream is not None:
            self.refreshed = torch.cuda.Event()
            self.refreshed.record(torch.cuda.current_stream(self.device))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        states = torch.as_tensor(obs)
        if self.device.type != "cuda":
            with torch.no_grad():
                return self.policy(self.network, states).numpy()
        stream = self.stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream), torch.no_grad():
            if self.refreshed is not None:
                stream.wait_event(self.refreshed)
            states = states.pin_memory().to(self.device, non_blocking=True)
            actions = self.policy(self.network, states) if self.graphs is None else self.replay(states)
            actions = actions.to("cpu", non_blocking=True)  # into page-locked memory: valid once `acted` is reached
            acted = torch.cuda.Event()
            acted.record(stream)
        acted.synchronize()
        return actions.numpy()

    def replay(self, states: torch.Tensor) -> torch.Tensor:
        """--compile-mode reduce-overhead: the policy captured in a CUDA graph (one per batch shape), then replayed: one
        launch per call. Captured by hand: torch.compile's own graphs spend ~0.3 ms per call on bookkeeping
        (pytorch/pytorch#150488), more than an emulator step. The output is overwritten by the next replay."""
        if states.shape not in self.graphs:
            static, side = states.clone(), torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            # compilation, autotuning and lazy initialisation before the capture, on a forked RNG: replays draw the noise
            # that uncaptured calls would
            with torch.random.fork_rng(devices=[self.device]), torch.cuda.stream(side):
                for _ in range(3):
                    self.policy(self.network, static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                actions = self.policy(self.network, static)
            self.graphs[states.shape] = graph, static, actions
        graph, static, actions = self.graphs[states.shape]
        static.copy_(states)
        graph.replay()
        return actions

    def state_dict(self) -> dict | None:
        """What a checkpoint needs to resume exactly: the lagged copy (None when the actor uses the network itself)."""
        return self.network.state_dict() if self.lagged else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.lagged:
            self.network.load_state_dict(state)
            self.written()
# === end shared ===


# === shared: ReplayBuffer ===
class ReplayBuffer:
    """Circular replay storing ONE 84x84 frame per agent step per env (SPEC §5): 1M transitions take 7.06 GB.

    Slot t of env e holds the newest frame of the observation the agent acted on, the action, the raw reward,
    `terminal` (stop bootstrapping after this transition) and `last` (the slot holds an episode's final
    observation and no transition starts from it). Stacks of 4 frames are rebuilt when sampling, zeroing frames
    of an earlier episode; n-step returns are built when sampling and stop at a terminal or an episode's end.
    Everything lives on `device`, so on a GPU sampling never touches the host, except with `device_slots`: a GPU too
    small for the whole memory keeps the frames of slots [0, device_slots) (SPEC §5: as much as fits) and the rest in
    page-locked host memory, read with one host synchronisation per batch. `frames` is the device's share.
    """

    def __init__(self, capacity, num_envs, device, n_step=1, gamma=0.99, stack=4, frame_shape=(84, 84), seed=0,
                 device_slots=None):
        self.size, self.num_envs = capacity // num_envs, num_envs  # slots per env
        if self.size <= n_step + stack:
            raise ValueError(f"--buffer-size {capacity} is too small for {num_envs} envs and n-step {n_step}")
        self.device, self.n_step, self.gamma, self.stack = device, n_step, gamma, stack
        near = self.size if device_slots is None else min(max(device_slots, 0), self.size)
        self.frames = torch.zeros((near, num_envs, *frame_shape), dtype=torch.uint8, device=device)
        self.host_frames = None if near == self.size else torch.zeros(  # page-locked: copies to the GPU are async
            (self.size - near, num_envs, *frame_shape), dtype=torch.uint8, pin_memory=self.frames.is_cuda)
        self.actions = torch.zeros((self.size, num_envs), dtype=torch.uint8, device=device)
        self.rewards = torch.zeros((self.size, num_envs), dtype=torch.float32, device=device)
        self.terminals = torch.zeros((self.size, num_envs), dtype=torch.bool, device=device)
        self.last = torch.zeros((self.size, num_envs), dtype=torch.bool, device=device)
        self.t = 0  # slots written per env so far (the write cursor is t % size)
        self.deferred = None  # a slot `add(..., defer=True)` holds until the next `flush()`
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.discounts = gamma ** torch.arange(n_step + 1, dtype=torch.float32, device=device)

    @staticmethod
    def nbytes(capacity, frame_shape=(84, 84)) -> int:
        """Bytes of the storage for `capacity` transitions, computed without allocating it."""
        return capacity * (math.prod(frame_shape) + 1 + 4 + 1 + 1)  # frame, action, reward, terminal, last

    def add(self, frames, actions, rewards, terminals, last, defer=False):
        """Write one slot for every env: frames (N, 84, 84) uint8, the rest (N,). With `defer` the slot is written by
        the next `flush()`, which every read of the replay calls first: the loops flush right after sending the next
        actions, so the copies overlap the emulators instead of delaying the next action. The arrays must not change."""
        self.flush()
        if defer:
            self.deferred = (frames, actions, rewards, terminals, last)
        else:
            self.write(frames, actions, rewards, terminals, last)

    def flush(self) -> None:
        if self.deferred is not None:
            deferred, self.deferred = self.deferred, None
            self.write(*deferred)

    def write(self, frames, actions, rewards, terminals, last):
        slot = self.t % self.size
        pinned = self.frames.is_cuda  # from page-locked memory a copy is asynchronous: it does not wait for the GPU
        values = []
        for value in (frames, actions, rewards, terminals, last):
            value = torch.as_tensor(value)
            if pinned:  # contiguous first: copy_ stages a strided source (obs[:, -1] of N > 1 envs) in pageable memory
                value = value.contiguous().pin_memory()
            values.append(value)
        self.put_frames(slot, values[0][None])
        for storage, value in zip((self.actions, self.rewards, self.terminals, self.last), values[1:]):
            storage[slot].copy_(value, non_blocking=pinned)  # straight into the slot
        self.t += 1

    def put_frames(self, start, frames, env=slice(None)) -> None:
        """Frames (k, num_envs, 84, 84), or (k, 84, 84) of one `env`, into slots [start, start + k): the device's share
        first, the rest in host memory. Asynchronous from page-locked memory."""
        near = len(self.frames)
        k = min(max(near - start, 0), len(frames))
        self.frames[start: start + k, env].copy_(frames[:k], non_blocking=frames.is_pinned())
        if k < len(frames):
            self.host_frames[start + k - near: start + len(frames) - near, env].copy_(frames[k:])

    def read_frames(self, slots, envs) -> torch.Tensor:
        """Frames of storage slots (already modulo size) and envs, broadcast together, on the device. A split replay
        takes its indices to the host (the one synchronisation) and copies only the frames that live there."""
        if self.host_frames is None:
            return self.frames[slots, envs]
        near, device = len(self.frames), self.device
        slots, envs = torch.broadcast_tensors(slots.cpu(), torch.as_tensor(envs).cpu())
        shape, slots, envs = slots.shape, slots.flatten(), envs.flatten()
        here, there = (slots < near).nonzero().squeeze(1), (slots >= near).nonzero().squeeze(1)
        out = torch.empty((len(slots), *self.frames.shape[2:]), dtype=torch.uint8, device=device)
        out[here.to(device)] = self.frames[slots[here].to(device), envs[here].to(device)]
        block = self.host_frames[slots[there] - near, envs[there]]
        out[there.to(device)] = block.pin_memory().to(device, non_blocking=True) if self.frames.is_cuda else block
        return out.view(*shape, *self.frames.shape[2:])

    def valid_range(self) -> tuple[int, int]:
        """Logical slots [lo, hi] a sample may start at: its stack is not overwritten, its n-step window is written."""
        self.flush()
        lo = max(0, self.t - self.size + self.stack - 1)
        return lo, self.t - self.n_step - 1

    def can_sample(self) -> bool:
        lo, hi = self.valid_range()
        return hi > lo  # two starts at least, so the fallback of `sample_indices` stays within [lo, hi]

    def sample_indices(self, batch_size, candidates=16):
        """Uniform over valid starts without host synchronisation: per sample, the first of `candidates` uniform
        draws whose slot is not `last`. If all draws hit final observations (probability below 1e-16 once episodes
        are longer than 10 steps) the slot before the first draw is used, the last transition of its episode."""
        lo, hi = self.valid_range()
        starts = torch.randint(lo, hi + 1, (batch_size, candidates), generator=self.generator, device=self.device)
        envs = torch.randint(0, self.num_envs, (batch_size, candidates), generator=self.generator, device=self.device)
        ok = ~self.last[starts % self.size, envs]
        pick = ok.float().argmax(1, keepdim=True)  # first valid draw
        idx, envs = starts.gather(1, pick).squeeze(1), envs.gather(1, pick).squeeze(1)
        missed = ~ok.any(1)
        return torch.where(missed, torch.where(idx > lo, idx - 1, idx + 1), idx), envs

    def stack_frames(self, idx, envs):
        """(B,) logical slots -> (B, stack, 84, 84) uint8, frames before the episode's first one set to zero.

        An episode ends at a `last` slot or after a `terminal` transition: with life losses as terminals
        (atari100k), the agent's stack restarts at each life, as Dopamine's runner begins a new agent episode.
        """
        offsets = torch.arange(-self.stack + 1, 1, device=self.device)
        slots = idx[:, None] + offsets  # (B, stack), oldest first
        frames = self.read_frames(slots % self.size, envs[:, None])
        ended = self.last[slots % self.size, envs[:, None]] | self.terminals[slots % self.size, envs[:, None]] | (slots < 0)
        # frame j belongs to an earlier episode if any slot in [j, idx - 1] ended one
        earlier = ended.flip(1).cumsum(1).flip(1) - ended[:, -1:].long() > 0
        return frames * ~earlier[..., None, None]

    def gather(self, idx, envs):
        """Batch for starts idx: states, actions, n-step clipped returns, bootstrap discounts, next states (after
        `sample_indices`, which flushes: `gather` may be compiled)."""
        k = torch.arange(self.n_step, device=self.device)
        slots = (idx[:, None] + k) % self.size
        rewards = self.rewards[slots, envs[:, None]].clamp(-1.0, 1.0)  # reward clipping inside the agent
        terminal = self.terminals[slots, envs[:, None]]
        ends = self.last[(idx[:, None] + k + 1) % self.size, envs[:, None]]
        stop = terminal | ends  # the episode (or, at a life loss, bootstrapping) stops after step k
        alive = (stop.cumsum(1) - stop.long()) == 0  # steps taken before the first stop, and the stop itself
        returns = (rewards * alive * self.discounts[:-1]).sum(1)
        steps = alive.sum(1)
        done = (terminal & alive).any(1)
        discounts = self.discounts[steps] * ~done
        # both stacks in one read: a split replay synchronises with the host once per batch
        states, next_states = self.stack_frames(torch.cat([idx, idx + steps]), torch.cat([envs, envs])).chunk(2)
        return states, self.actions[idx % self.size, envs].long(), returns, discounts, next_states

    def sample(self, batch_size):
        return self.gather(*self.sample_indices(batch_size))

    def compile(self) -> None:
        """--compile: `gather`'s ~60 small tensor operations fuse into a few kernels (on a GPU, launches cost more
        than their work). Shapes are static: one compilation per batch size. A split replay's reads go through the
        host, so its `gather` stays eager."""
        if self.host_frames is None:
            self.gather = torch.compile(self.gather, dynamic=False, fullgraph=True)

    def state_dict(self) -> dict:
        """Contents and sampler state; only the written part when not yet full (a slice would save everything)."""
        self.flush()
        filled = min(self.t, self.size)
        keep = (lambda x: x) if filled == self.size else (lambda x: x[:filled].to("cpu", copy=True))  # not on the GPU
        frames = keep(self.frames) if self.host_frames is None else torch.cat(  # one array whatever the split
            [self.frames[:filled].cpu(), self.host_frames[:max(filled - len(self.frames), 0)]])
        names = ["actions", "rewards", "terminals", "last"]
        return {"t": self.t, "generator": self.generator.get_state(), "frames": frames,
                **{k: keep(getattr(self, k)) for k in names}}

    def load_state_dict(self, state: dict) -> None:
        if state["frames"].shape[1:] != self.frames.shape[1:] or state["frames"].shape[0] > self.size:
            raise ValueError(f"replay of shape {tuple(state['frames'].shape)} does not fit this run's replay "
                             f"{(self.size, *self.frames.shape[1:])}")
        self.deferred = None  # the loaded contents replace everything, a held slot too
        self.put_frames(0, state["frames"])
        for k in ["actions", "rewards", "terminals", "last"]:
            getattr(self, k)[: state[k].shape[0]] = state[k].to(self.device)
        self.t = state["t"]
        restore_generator(self.generator, state["generator"])
# === end shared ===


# === shared: PrioritizedReplayBuffer ===
class SumTree:
    """Binary sum tree over `capacity` leaves, stored as one float64 array on `device`: node 1 is the root, node k
    has children 2k and 2k+1, leaf i is node 2^depth + i. Sampling and updates are vectorised over the batch (one
    gather per level, 20 levels for 1M leaves) and never synchronise with the host."""

    def __init__(self, capacity: int, device):
        self.depth = max(1, math.ceil(math.log2(capacity)))
        self.first_leaf = 2**self.depth
        self.nodes = torch.zeros(2 * self.first_leaf, dtype=torch.float64, device=device)
        self.levels = torch.arange(1, self.depth + 1, device=device)[:, None]  # node >> level: its ancestor

    def compile(self) -> None:
        """Fuse the level loops (eagerly 4-8 kernels per level): `find` becomes one kernel that walks all levels,
        `update` at most one kernel per level. Same arithmetic, so the same results; one compilation per batch size."""
        self.find = torch.compile(self.find, dynamic=False, fullgraph=True)
        self.update = torch.compile(self.update, dynamic=False, fullgraph=True)

    def total(self) -> torch.Tensor:
        return self.nodes[1]

    def get(self, leaf: torch.Tensor) -> torch.Tensor:
        return self.nodes[leaf + self.first_leaf]

    def update(self, leaf: torch.Tensor, value: torch.Tensor) -> None:
        """Set leaves (K,) to values (K,), then recompute their ancestors level by level. A leaf given twice gets its
        last value, as Dopamine's in-order updates (a CUDA scatter would keep an arbitrary one)."""
        node = leaf + self.first_leaf
        last = ((leaf[:, None] == leaf[None, :]) * torch.arange(len(leaf), device=leaf.device)).amax(1)
        self.nodes[node] = value.to(self.nodes.dtype)[last]
        children = self.nodes.view(-1, 2)  # row k: the sums of node k's children 2k and 2k + 1
        for parents in (node >> self.levels).unbind():  # every level's ancestors at once: no kernel per level for them
            self.nodes[parents] = children[parents].sum(1)

    def find(self, query: torch.Tensor) -> torch.Tensor:
        """Leaf whose interval of the cumulative sum holds each query in [0, total); never a zero-priority leaf."""
        children = self.nodes.view(-1, 2)  # row k: the sums of node k's children 2k and 2k + 1
        node, zero = torch.ones_like(query, dtype=torch.long), torch.zeros((), dtype=self.nodes.dtype, device=query.device)
        for _ in range(self.depth):
            left, right = children[node].unbind(1)
            go_right = query >= left
            # keep query < the chosen child's sum despite rounding, so a child of sum 0 is never entered
            query = torch.where(go_right, torch.minimum(query - left, torch.nextafter(right, zero)), query)
            node = 2 * node + go_right
        return node - self.first_leaf

    def stratified_sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One query per equal segment of the total priority, as Dopamine's sum tree samples a batch."""
        total = self.total()
        u = torch.rand(batch_size, generator=generator, device=self.nodes.device, dtype=torch.float64)
        query = (torch.arange(batch_size, device=self.nodes.device) + u) / batch_size * total
        return self.find(torch.minimum(query, torch.nextafter(total, torch.zeros_like(total))))


class PrioritizedReplayBuffer(ReplayBuffer):
    """`ReplayBuffer` with proportional prioritisation (Schaul et al. 2016) as in Dopamine's Rainbow (SPEC §4).

    Leaf `slot * num_envs + env` of a sum tree holds the priority of the transition starting at that slot. Only valid
    starts (those `valid_range()` allows that are not final observations) have a priority above 0: a slot gets the
    largest priority so far once its n-step window is written, and 0 once the write cursor reaches its stack.
    """

    def __init__(self, capacity, num_envs, device, n_step=1, gamma=0.99, stack=4, frame_shape=(84, 84), seed=0,
                 device_slots=None):
        super().__init__(capacity, num_envs, device, n_step, gamma, stack, frame_shape, seed, device_slots)
        self.tree = SumTree(self.size * num_envs, device)
        self.max_priority = torch.ones((), dtype=torch.float64, device=device)  # Dopamine starts at 1
        self.env_ids = torch.arange(num_envs, device=device)

    @staticmethod
    def nbytes(capacity, frame_shape=(84, 84)) -> int:
        """Bytes of the storage and the sum tree (float64, 2^ceil(log2 capacity) leaves) for `capacity` transitions."""
        return ReplayBuffer.nbytes(capacity, frame_shape) + 2 * 2 ** max(1, math.ceil(math.log2(capacity))) * 8

    def leaves(self, idx, envs) -> torch.Tensor:
        return (idx % self.size) * self.num_envs + envs

    def write(self, frames, actions, rewards, terminals, last):
        super().write(frames, actions, rewards, terminals, last)
        lo, hi = self.valid_range()
        # no longer valid: the slot just overwritten and the one whose oldest stack frame it held (lo - 1); newly
        # valid: slot hi, whose n-step window is written (a final observation starts no transition). Before hi >= 0
        # the just-overwritten slot stands in for it with 0 again, so the tree always updates 3 x num_envs leaves.
        slots = [(self.t - 1) % self.size, (lo - 1) % self.size, hi % self.size if hi >= 0 else (self.t - 1) % self.size]
        new = self.max_priority * ~self.last[slots[2]] * (hi >= 0)
        values = torch.cat([torch.zeros(2 * self.num_envs, dtype=torch.float64, device=self.device), new])
        self.tree.update(torch.cat([slot * self.num_envs + self.env_ids for slot in slots]), values)

    def can_sample(self) -> bool:
        lo, hi = self.valid_range()
        return hi > lo  # two slots: one of them is not a final observation, so the tree's total is positive

    def compile(self) -> None:
        super().compile()
        self.tree.compile()

    def sample_indices(self, batch_size):
        """Starts drawn with probability priority / total priority, stratified over the batch; logical slots, envs."""
        self.flush()
        leaf = self.tree.stratified_sample(batch_size, self.generator)
        slot, envs = leaf // self.num_envs, leaf % self.num_envs
        newest = self.t - 1
        return newest - (newest - slot) % self.size, envs  # the most recent logical slot stored at that position

    def importance_weights(self, idx, envs) -> torch.Tensor:
        """1 / sqrt(P(i)) divided by the batch maximum (beta = 0.5, fixed), as Dopamine computes it: from the raw
        priorities, 1 / sqrt(p_i + 1e-10) (its `sampling_probabilities` are priorities; the total cancels)."""
        weights = (self.tree.get(self.leaves(idx, envs)) + 1e-10).rsqrt()
        return (weights / weights.max()).float()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tree": self.tree.nodes, "max_priority": self.max_priority}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tree.nodes.copy_(state["tree"])
        self.max_priority = state["max_priority"].to(self.device)

    def update_priorities(self, idx, envs, losses) -> None:
        """New priorities sqrt(loss + 1e-10) (alpha = 0.5 on the loss; Dopamine), on the device."""
        priority = (losses.detach().double() + 1e-10).sqrt()
        self.tree.update(self.leaves(idx, envs), priority)
        self.max_priority = torch.maximum(self.max_priority, priority.max())
# === end shared ===


# === shared: dopamine_dataset ===
DATASET_ARRAYS = {"observation": np.uint8, "action": np.int32, "reward": np.float32, "terminal": np.uint8}
DATASET_CAPACITY = 1_000_000  # transitions per checkpoint file: the replay capacity of the DQN that logged the data
DATASET_PADDING = 3  # Dopamine starts every episode with stack_size - 1 zero transitions (OutOfGraphReplayBuffer.add)
DATASET_FILE = re.compile(r"^(?:\$store\$_)?(observation|action|reward|terminal|add_count|invalid_range)_ckpt\.(\d+)\.gz$")


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message is one line naming the file or directory."""


def dataset_file(run_dir: str, name: str, checkpoint: int, folder: str = "replay_logs") -> str:
    """`{run_dir}/replay_logs/$store$_{name}_ckpt.{N}.gz` for the stored arrays, `{name}_ckpt.{N}.gz` for the others."""
    prefix = "$store$_" if name in DATASET_ARRAYS else ""
    return os.path.join(run_dir, folder, f"{prefix}{name}_ckpt.{checkpoint}.gz")


def write_npy_gz(path: str, array: np.ndarray = None, shape=None, blocks=()) -> None:
    """A gzip of `np.save(..., allow_pickle=False)`, as Dopamine saves each replay array; fsynced. For frames, give the
    array's `shape` and an iterable of uint8 `blocks` instead: the same bytes, never all in memory at once."""
    with open(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6) as out:  # zlib's default level; Dopamine's is 9
            if array is not None:
                np.save(out, array, allow_pickle=False)
            else:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(out, header)  # what np.save writes before the data
                for block in blocks:
                    out.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())


def save_replay_dataset(rb, root: str, game: str) -> list:
    """Write the replay's content in the DQN Replay Dataset layout (SPEC §4): `{root}/{game}/{run}/replay_logs/`, one
    run per env, numbered from the first free number. As Dopamine's logged buffer: 3 zero transitions before each
    episode, terminal 1 on an episode's last transition (a truncation too, as the agent that logged the public data
    did), no final observations, the replay's rewards, checkpoint files of at most 1M transitions. A run is written
    to `replay_logs.tmp` and renamed when complete: a crash never leaves a partial dataset under the final name."""
    rb.flush()
    filled = min(rb.t, rb.size)
    order = (torch.arange(rb.t - filled, rb.t) % rb.size).numpy()  # the stored slots, oldest first
    game_dir = os.path.join(root, game)
    os.makedirs(game_dir, exist_ok=True)
    written = []
    if filled == 0:
        return written
    for env in range(rb.num_envs):
        terminal, last = (getattr(rb, k)[:, env].cpu().numpy()[order] for k in ("terminals", "last"))
        ends = terminal.copy()
        ends[:-1] |= last[1:]  # the transition before a final observation ends its episode (a truncation too)
        begins = np.zeros_like(last)
        begins[1:] = last[:-1] | terminal[:-1]  # Dopamine pads after every terminal (and at an atari100k life loss)
        begins[0] = rb.t <= rb.size  # the first slot ever written starts the first episode
        kept = np.flatnonzero(~last)  # final observations are not stored: Dopamine keeps no next observation
        pads = DATASET_PADDING * begins[kept]
        rows = np.arange(len(kept)) + np.cumsum(pads)  # output row of each kept slot, after its episode's padding
        total = len(kept) + int(pads.sum())
        source = np.full(total, -1, dtype=np.int64)  # replay slot of each output row; -1: a zero transition
        source[rows] = order[kept]
        arrays = {name: np.zeros(total, dtype) for name, dtype in DATASET_ARRAYS.items() if name != "observation"}
        arrays["action"][rows] = rb.actions[:, env].cpu().numpy()[order[kept]]
        arrays["reward"][rows] = rb.rewards[:, env].cpu().numpy()[order[kept]]
        arrays["terminal"][rows] = ends[kept]
        run = 1
        while True:  # claim the first free run number (makedirs is atomic: parallel writers never share one)
            try:
                os.makedirs(os.path.join(game_dir, str(run)))
                break
            except FileExistsError:
                run += 1
        run_dir = os.path.join(game_dir, str(run))
        os.makedirs(os.path.join(run_dir, "replay_logs.tmp"))
        for checkpoint, start in enumerate(range(0, total, DATASET_CAPACITY)):
            stop = min(start + DATASET_CAPACITY, total)

            def frames(a, b, env=env):  # rows [a, b) of the output, zero frames for the padding
                block = np.zeros((b - a, *rb.frames.shape[2:]), np.uint8)
                real = source[a:b] >= 0
                block[real] = rb.read_frames(torch.as_tensor(source[a:b][real], device=rb.device), env).cpu().numpy()
                return block

            path = lambda name: dataset_file(run_dir, name, checkpoint, "replay_logs.tmp")
            blocks = (frames(a, min(a + 4096, stop)) for a in range(start, stop, 4096))
            write_npy_gz(path("observation"), shape=(stop - start, *rb.frames.shape[2:]), blocks=blocks)
            for name, array in arrays.items():
                write_npy_gz(path(name), array[start:stop])
            write_npy_gz(path("add_count"), np.array(stop - start, dtype=np.int64))
            cursor = (stop - start) % DATASET_CAPACITY  # Dopamine's invalid_range(cursor, 1M, stack 4, update horizon 1)
            write_npy_gz(path("invalid_range"), np.array([(cursor - 1 + i) % DATASET_CAPACITY for i in range(5)]))
        os.replace(os.path.join(run_dir, "replay_logs.tmp"), os.path.join(run_dir, "replay_logs"))
        written.append(run_dir)
    return written


def find_dataset_runs(root: str, game: str) -> tuple[str, dict]:
    """`{root}/{game}` (matched ignoring case and punctuation) and its runs {number: run directory}: the numbered
    directories that hold a `replay_logs` folder."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset directory {root} does not exist; download the DQN Replay Dataset (README) or pass "
                           "--dataset-dir")
    key = lambda name: re.sub(r"[^a-z0-9]", "", name.lower())
    games = {key(d): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    if key(game) not in games:
        raise DatasetError(f"{os.path.join(root, game)} does not exist; games in {root}: {', '.join(sorted(games.values())) or 'none'}")
    game_dir = os.path.join(root, games[key(game)])
    runs = {int(d): os.path.join(game_dir, d) for d in os.listdir(game_dir)
            if d.isdigit() and os.path.isdir(os.path.join(game_dir, d, "replay_logs"))}
    if not runs:
        raise DatasetError(f"{game_dir} holds no run directory with a replay_logs folder ({game_dir}/1/replay_logs/...)")
    return game_dir, runs


def dataset_read_error(path: str, error: Exception) -> DatasetError:
    """One line for what went wrong reading `path`."""
    if isinstance(error, DatasetError):
        return error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:150]
    if isinstance(error, EOFError):
        return DatasetError(f"{path}: truncated gzip ({reason}); download it again")
    if isinstance(error, (OSError, zlib.error)):
        return DatasetError(f"{path}: not a readable gzip file ({reason})")
    if "allow_pickle" in reason:
        return DatasetError(f"{path}: holds pickled Python objects; refused (the dataset is read with allow_pickle=False)")
    return DatasetError(f"{path}: not a .npy array as np.save writes it ({reason})")


def read_npy_gz(path: str) -> np.ndarray:
    """np.load(allow_pickle=False) of a gzip file, read to its end so that the gzip checksum is checked too."""
    try:
        with gzip.open(path, "rb") as f:
            array = np.load(f, allow_pickle=False)
            drain_gzip(f)
            return array
    except Exception as error:
        raise dataset_read_error(path, error) from None


def drain_gzip(f) -> None:
    """Reads an open gzip file to its end: only there does gzip compare the data with the trailer's CRC-32 (np.load
    and readinto stop at the array's last byte, and a flipped byte inside the data is otherwise read silently)."""
    while f.read(1 << 24):
        pass


def read_npy_header(path: str, f=None) -> tuple:
    """(shape, dtype, header bytes) of the gzipped .npy file `path`, read from `f` if open; like
    np.load(allow_pickle=False), it refuses object arrays."""
    if f is None:
        try:
            with gzip.open(path, "rb") as f:
                return read_npy_header(path, f)
        except OSError as error:
            raise dataset_read_error(path, error) from None
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise DatasetError(f"{path}: .npy format version {version} is not supported (np.save writes 1.0)")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
    except Exception as error:
        raise dataset_read_error(path, error) from None
    if dtype.hasobject:
        raise DatasetError(f"{path}: holds pickled Python objects; refused (the dataset is read with allow_pickle=False)")
    if fortran_order and len(shape) > 1:
        raise DatasetError(f"{path}: a Fortran-ordered array; np.save of the replay writes C order")
    return shape, dtype, f.tell()


def random_episodes(terminal: np.ndarray, cursor: int, stored: int, rows: int, draw: np.random.Generator) -> list:
    """`rows` of a checkpoint's `stored` transitions as whole episodes drawn at random without replacement (the last
    one drawn cut to its first rows to fit), as chronologically ordered pieces [a, b) of file rows. An episode runs
    from the row after a terminal (Dopamine's 3 zero transitions come first) to its terminal; the checkpoint's oldest
    and newest rows may cut one. Adjacent episodes join one piece; a piece is split where a circular file wraps."""
    capacity = len(terminal)
    wrap = capacity - cursor  # chronological position p is row cursor + p before the wrap, p - wrap after it
    chronological = np.concatenate([terminal[cursor:], terminal[:cursor]])[:stored]
    bounds = np.unique(np.concatenate([[0], np.flatnonzero(chronological) + 1, [stored]]))
    picked, left = [], rows
    for i in draw.permutation(len(bounds) - 1):
        if left <= 0:
            break
        p0, p1 = int(bounds[i]), int(min(bounds[i + 1], bounds[i] + left))
        picked.append([p0, p1])
        left -= p1 - p0
    merged = []
    for p0, p1 in sorted(picked):
        if merged and merged[-1][1] == p0:
            merged[-1][1] = p1
        else:
            merged.append([p0, p1])
    pieces = []
    for p0, p1 in merged:
        pieces += [(cursor + a, cursor + b) for a, b in [(p0, min(p1, wrap))] if a < b]
        pieces += [(a - wrap, b - wrap) for a, b in [(max(p0, wrap), p1)] if a < b]
    return pieces


def scan_dataset(run_dirs: dict, checkpoints, fraction: float, num_actions: int, selection: str,
                 seed: int = 0) -> list:
    """Find and check every file of the chosen runs {number: directory} and checkpoints (all present if empty), all but
    the frames themselves, which `load_dataset` reads. From each checkpoint a `fraction` of its stored transitions is
    used: `selection` "random", whole episodes drawn at random (paper §5.1: "drawn randomly"; seeded by seed, run and
    checkpoint), or "first", its first rows, as the reference loaders (batch_rl and Dopamine's JaxFixedReplayBuffer
    keep `store[:capacity]` of each checkpoint; the CQL code the first 10,000 of each for 1%). Returns one record per
    checkpoint: its file, the rows to load as chronologically contiguous pieces [a, b) and their actions, rewards,
    terminals."""
    records = []
    for run, run_dir in sorted(run_dirs.items()):
        found = {int(m.group(2)) for m in map(DATASET_FILE.match, os.listdir(os.path.join(run_dir, "replay_logs"))) if m}
        if not found:
            raise DatasetError(f"{os.path.join(run_dir, 'replay_logs')} holds no *_ckpt.N.gz files; download the run's "
                               "files (README) or choose other --runs")
        for checkpoint in sorted(checkpoints or found):
            paths = {name: dataset_file(run_dir, name, checkpoint) for name in [*DATASET_ARRAYS, "add_count"]}
            for path in paths.values():
                if not os.path.isfile(path):
                    raise DatasetError(f"{path}: missing; every checkpoint needs its observation, action, reward, "
                                       "terminal and add_count files")
            add_count = read_npy_gz(paths["add_count"])
            if add_count.size != 1 or add_count.dtype.kind not in "iu" or int(add_count.reshape(())) < 0:
                raise DatasetError(f"{paths['add_count']}: expected a non-negative integer (0-d array), got "
                                   f"{add_count.dtype} of shape {add_count.shape}")
            add_count = int(add_count.reshape(()))
            shape, dtype, header = read_npy_header(paths["observation"])
            capacity = shape[0] if shape else 0
            if dtype != np.uint8 or len(shape) != 3 or shape[1:] != (84, 84):
                raise DatasetError(f"{paths['observation']}: expected uint8 frames of shape (N, 84, 84), got {dtype} {shape}")
            with open(paths["observation"], "rb") as f:  # the gzip trailer holds the data size mod 2^32: a cut file fails
                f.seek(max(os.path.getsize(paths["observation"]) - 4, 0))
                size = int.from_bytes(f.read(4), "little")
            if size != (header + capacity * 84 * 84) % 2**32:
                raise DatasetError(f"{paths['observation']}: truncated gzip (the trailer gives {size} bytes of data, the "
                                   f"array needs {header + capacity * 84 * 84}); download it again")
            columns = {}
            for name in ("action", "reward", "terminal"):
                columns[name] = read_npy_gz(paths[name])
                if columns[name].dtype != DATASET_ARRAYS[name] or columns[name].shape != (capacity,):
                    raise DatasetError(f"{paths[name]}: expected {np.dtype(DATASET_ARRAYS[name])} of shape ({capacity},) "
                                       f"like the observations, got {columns[name].dtype} {columns[name].shape}")
            stored = min(add_count, capacity)  # a buffer that never filled up holds add_count transitions
            rows = int(fraction * stored + 0.5)
            cursor = add_count % capacity if add_count >= capacity > 0 else 0
            if selection == "random":
                draw = np.random.default_rng([seed % 2**32, run, checkpoint])
                chunks = random_episodes(columns["terminal"], cursor, stored, rows, draw)
            else:  # rows [0, rows): oldest first [cursor, rows) then [0, min(cursor, rows)), two pieces if the buffer
                # had wrapped around inside them (the public checkpoints wrap at their last row: one piece)
                chunks = [(a, b) for a, b in ((cursor, rows), (0, min(cursor, rows))) if a < b]
            picked = {name: np.concatenate([column[a:b] for a, b in chunks] or [column[:0]]) for name, column in columns.items()}
            bad = {"action": (picked["action"] < 0) | (picked["action"] >= num_actions),
                   "reward": ~np.isfinite(picked["reward"]), "terminal": picked["terminal"] > 1}
            for name, mask in bad.items():
                if mask.any():
                    row = np.flatnonzero(mask)[0]
                    raise DatasetError(f"{paths[name]}: bad {name} {picked[name][row]} at row {row} of the loaded part"
                                       + (f" (the game has {num_actions} actions)" if name == "action" else ""))
            start = 0
            for a, b in chunks:  # Dopamine's padding: the 3 transitions after a terminal are zeros
                terminal = picked["terminal"][start:start + b - a].astype(bool)
                pad = np.zeros(b - a, dtype=bool)
                for lag in range(1, DATASET_PADDING + 1):
                    pad[lag:] |= terminal[:-lag]
                nonzero = (picked["action"][start:start + b - a] != 0) | (picked["reward"][start:start + b - a] != 0) | terminal
                if (pad & nonzero).any():
                    raise DatasetError(f"{paths['terminal']}: the transitions after the terminal at row "
                                       f"{a + np.flatnonzero(pad & nonzero)[0]} are not Dopamine's zero padding; this "
                                       "reads the DQN Replay Dataset layout (3 zero transitions before each episode)")
                start += b - a
            records.append({"run": run, "checkpoint": checkpoint, "observation": paths["observation"],
                            "capacity": capacity, "add_count": add_count, "rows": rows, "chunks": chunks,
                            "action": picked["action"].astype(np.uint8), "reward": picked["reward"],
                            "terminal": picked["terminal"].astype(bool)})
    return records


def load_dataset(rb, records: list, workers: int = 8, verified: set | None = None) -> torch.Tensor:
    """Fill `rb` (one env) with the records' transitions, piece after piece, and return the logical slots a sample may
    start at. As in Dopamine's sampler, a piece's first 3 slots only complete stacks and its last n only end n-step
    windows (unless a terminal in the piece ends theirs), and the 3 zero transitions after a terminal become `last`
    slots: no start, stack or window ever crosses from one checkpoint (or one piece of it) into another. Frames are
    read in parallel, up to each file's last loaded row; a file not yet in `verified` is read to its end, to check its
    gzip checksum once (then added: a run reloading checkpoints every iteration decompresses their rest only once)."""
    verified = set() if verified is None else verified
    offset, starts, jobs = 0, [], []
    for record in records:
        placed, start, pads = [], 0, []
        for a, b in record["chunks"]:
            terminal = record["terminal"][start:start + b - a]
            pad = np.zeros(b - a, dtype=bool)
            for lag in range(1, DATASET_PADDING + 1):
                pad[lag:] |= terminal[:-lag]
            valid = ~pad
            valid[: rb.stack - 1] = False  # their stacks would reach before the piece (Dopamine: index >= stack - 1)
            # windows that would pass its end (Dopamine: cursor - n), unless a terminal of the piece ends them first
            # (a drawn episode's last n transitions)
            ends_inside = np.flip(np.logical_or.accumulate(np.flip(terminal)))  # a terminal at or after the slot
            valid[max(b - a - rb.n_step, 0):] &= ends_inside[max(b - a - rb.n_step, 0):]
            starts.append(offset + start + np.flatnonzero(valid))
            placed.append((a, b, offset + start))
            pads.append(pad)
            start += b - a
        slots = slice(offset, offset + start)  # the pieces one after another: one copy per column and checkpoint
        rb.actions[slots, 0] = torch.as_tensor(record["action"], device=rb.device)
        rb.rewards[slots, 0] = torch.as_tensor(record["reward"], device=rb.device)
        rb.terminals[slots, 0] = torch.as_tensor(record["terminal"], device=rb.device)
        rb.last[slots, 0] = torch.as_tensor(np.concatenate(pads or [np.zeros(0, dtype=bool)]), device=rb.device)
        offset += start
        jobs.append((record["observation"], placed))

    def read_frames(path, placed):
        placed = sorted(placed)  # by row: the pieces a block of rows reaches are consecutive
        ends = np.array([b for _, b, _ in placed])
        rows = max(ends, default=0)

        def read(f, count):  # the next `count` frames of the file; a read error names the file
            try:
                block = bytearray(count * 84 * 84)
                view, got = memoryview(block), 0
                while got < len(block):
                    n = f.readinto(view[got:])
                    if not n:
                        raise EOFError("the file ends before its last frame")
                    got += n
                return torch.from_numpy(np.frombuffer(block, np.uint8).reshape(-1, 84, 84))
            except Exception as error:
                raise dataset_read_error(path, error) from None

        try:
            f = gzip.open(path, "rb")
        except OSError as error:
            raise dataset_read_error(path, error) from None
        with f:
            read_npy_header(path, f)
            for first in range(0, rows, 4096):  # rows [0, rows): up to the last row loaded
                frames = read(f, min(first + 4096, rows) - first)
                for a, b, at in placed[np.searchsorted(ends, first, side="right"):]:
                    if a >= first + len(frames):
                        break
                    lo, hi = max(a, first), min(b, first + len(frames))
                    rb.put_frames(at + lo - a, frames[lo - first: hi - first], env=0)  # the GPU's share first
            if path not in verified:
                try:
                    drain_gzip(f)
                except Exception as error:
                    raise dataset_read_error(path, error) from None
                verified.add(path)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
        for future in [pool.submit(read_frames, *job) for job in jobs]:
            future.result()
    rb.t = offset
    return torch.as_tensor(np.concatenate(starts or [np.zeros(0, np.int64)]), dtype=torch.long, device=rb.device)
# === end shared ===


# === shared: metrics ===
def srank(matrix: torch.Tensor, delta: float = 0.01) -> int:
    """Effective rank (Kumar et al. 2021): smallest k whose top-k singular values hold 1 - delta of their sum."""
    sv = torch.linalg.svdvals(matrix.double())
    if sv.sum() <= 0:
        return 0
    return int((sv.cumsum(0) / sv.sum() < 1.0 - delta).sum()) + 1


def dormant_fraction(hidden: torch.Tensor, mask, tau: float) -> float:
    """Fraction of tau-dormant units (Sokar et al. 2023): s_i = E|h_i| / mean_k E|h_k| <= tau.

    hidden (B, n, p, h): the score of (expert, unit) averages over the batch and the p slots (where `mask`
    (B, n, p) marks real tokens, for Top1's capacity buffer); a baseline layer is (B, 1, 1, units).
    """
    weights = torch.ones(hidden.shape[:3], device=hidden.device) if mask is None else mask.float()
    score = (hidden.abs() * weights[..., None]).sum((0, 2)) / weights.sum((0, 2))[:, None].clamp(min=1.0)
    score = score / score.mean().clamp(min=1e-12)
    return float((score <= tau).float().mean())


def entk_srank(model: nn.Module, sample_loss, inputs: tuple, delta: float = 0.01) -> int:
    """srank of the B x B Gram matrix of per-sample loss gradients over all parameters (empirical NTK)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, *single):
        q_fn = lambda x: torch.func.functional_call(model, (p, buffers), (x.unsqueeze(0),))[0]
        return sample_loss(q_fn, *single)

    per_sample_grad = torch.func.vmap(
        torch.func.grad(loss_one), in_dims=(None,) + (0,) * len(inputs), randomness="different", chunk_size=8
    )
    grads = per_sample_grad(params, *inputs)
    gram = sum((g.flatten(1) @ g.flatten(1).T).double() for g in grads.values())
    return srank(gram, delta)


def routing_stats(info: dict) -> dict:
    """Expert load (share of token mass per expert), normalised router entropy, and Top1's dropped tokens."""
    stats = {}
    if "expert_mass" in info:
        mass = info["expert_mass"].float()  # (B, m, n)
        n = mass.shape[-1]
        load = mass.mean((0, 1))
        for i, share in enumerate(load.tolist()):
            stats[f"moe/expert_load_{i}"] = share
        probs = info.get("gate_probs", mass).float()
        entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()
        stats["moe/router_entropy"] = float(entropy / math.log(n)) if n > 1 else 0.0
    if "dropped" in info:
        stats["moe/dropped_fraction"] = float(info["dropped"])
    return stats


def analysis_metrics(model: nn.Module, states: torch.Tensor, sample_loss, loss_inputs: tuple) -> dict:
    """The Figure 10 metrics on one batch (SPEC §6)."""
    with torch.no_grad():
        _, info = model(states, return_info=True)
    features = info["features"].float()
    metrics = {
        "metrics/dormant_tau0": dormant_fraction(info["hidden"], info["hidden_mask"], 0.0),
        "metrics/dormant_tau0.1": dormant_fraction(info["hidden"], info["hidden_mask"], 0.1),
        "metrics/feature_norm": float(features.norm(dim=1).mean()),
        "metrics/srank": srank(features),
        "metrics/entk_srank": entk_srank(model, sample_loss, loss_inputs),
    }
    metrics.update(routing_stats(info))
    return metrics
# === end shared ===


# === shared: progress ===
class Progress:
    """A tqdm bar (steps, SPS, recent return, ETA) on a terminal; plain periodic lines otherwise (CI, Slurm logs)."""

    def __init__(self, total: int, print_every: int, start_step: int = 0):
        self.total, self.print_every, self.start, self.start_step = total, print_every, time.time(), start_step
        self.next_print = (start_step // print_every + 1) * print_every
        self.returns = collections.deque(maxlen=20)
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, returns=()):
        self.returns.extend(returns)  # called every agent step: the mean is taken only when shown
        recent = lambda: f"{np.mean(self.returns):.1f}" if self.returns else "n/a"
        if self.bar is not None:
            if len(returns):
                self.bar.set_postfix_str(f"return {recent()}", refresh=False)
            self.bar.update(step - self.bar.n)  # tqdm shows steps/s and the ETA
        elif step >= self.next_print or step >= self.total:
            self.next_print = (step // self.print_every + 1) * self.print_every
            elapsed = time.time() - self.start
            sps = (step - self.start_step) / max(elapsed, 1e-9)
            eta = (self.total - step) / max(sps, 1e-9)
            print(f"step {step}/{self.total}  SPS {sps:.0f}  return {recent()}  elapsed {elapsed:.0f}s  ETA {eta:.0f}s", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def peak_memory(device: torch.device) -> dict:
    """Peak resident host memory of this process, and peak GPU memory allocated by torch and reserved by its caching
    allocator (what a GPU shared by several runs must hold), in bytes (summary.json)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    cuda = device.type == "cuda"
    return {"peak_host_memory_bytes": rss, "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else 0,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0}
# === end shared ===


# === shared: checkpoint ===
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the launcher requeues the job, which continues with --resume auto
EXIT_NONFINITE = 3
CHECKPOINT_FORMAT = 3  # 2: the lagged actor's copy, envs reseeded per segment; 3: Atari 100k no-op starts in agent steps
RESUMABLE_CHANGES = {"resume", "runs_dir", "total_timesteps", "checkpoint_every", "checkpoint_keep",
                     "checkpoint_replay", "cuda", "gpu_replay_fraction", "compile", "compile_mode", "tf32", "log_every",
                     "print_every", "metrics_every", "save_model", "save_replay", "eval_episodes", "eval_epsilon",
                     "eval_every"}


def episode_seed(seed: int, env: int, episode: int) -> int:
    """Seed of an env's episode-th seeded reset; unique per (env, episode) for fewer than 7,919 envs."""
    return (seed * 1_000_003 + env * 10_007 + episode * 7_919) % (2**31 - 1)


RESEED_STEPS = 27_000  # agent steps between an env's seeded resets (a resume replays at most this plus one episode)


class EnvTracker:
    """Makes vector envs resumable without emulator snapshots (ale-py's vector env has none): an env's state is the
    seed of its last seeded reset plus the actions taken since (the episodes in between begin with ale-py's own
    auto-reset, which replaying the actions repeats). A seeded reset reloads the ROM, ~0.2 s (once per episode it
    halved the loop's rate with short episodes), so an env is reseeded only at the first episode end at least
    `reseed_steps` agent steps after its last one."""

    def __init__(self, seed: int, num_envs: int, reseed_steps: int = RESEED_STEPS):
        self.seed, self.segments, self.reseed_steps = seed, np.zeros(num_envs, dtype=np.int64), reseed_steps
        self.actions = [[] for _ in range(num_envs)]  # per env: every action since its last seeded reset

    def seeds(self, mask=None) -> np.ndarray:
        envs = np.arange(len(self.segments)) if mask is None else np.flatnonzero(mask)
        return np.array([episode_seed(self.seed, e, int(self.segments[e])) for e in envs], dtype=np.int64)

    def send(self, envs, actions):
        """Start a step: the emulators run in ale-py's C++ threads until `envs.recv()`, so the learner can update
        meanwhile (acting overlapped with learning)."""
        for e, a in enumerate(actions):
            self.actions[e].append(int(a))
        envs.send(np.asarray(actions, dtype=np.int64))

    def reset_ended(self, envs, was_done, obs):
        """After the auto-reset step of ended episodes: the envs that played `reseed_steps` since their last seeded
        reset are reset again with their next seed; the others go on from ale-py's auto-reset."""
        if not was_done.any():
            return obs
        reseed = was_done & (np.array([len(a) for a in self.actions]) >= self.reseed_steps)
        if reseed.any():
            self.segments[reseed] += 1
            for e in np.flatnonzero(reseed):
                self.actions[e] = []
            reset_obs, _ = envs.reset(seed=self.seeds(reseed), options={"reset_mask": reseed})
            obs = np.where(reseed[:, None, None, None], reset_obs, obs)
        return obs

    def state_dict(self) -> dict:
        return {"segments": torch.tensor(self.segments), "actions": [torch.tensor(a, dtype=torch.uint8) for a in self.actions]}

    def restore(self, envs, state: dict, expected_obs: np.ndarray) -> np.ndarray:
        """Replay every env's actions since its last seeded reset; envs with fewer are reset later so all end
        together. The result must equal the observation saved in the checkpoint."""
        self.segments = state["segments"].numpy().copy()
        self.actions = [a.tolist() for a in state["actions"]]
        lengths = np.array([len(a) for a in self.actions])
        longest = int(lengths.max())
        obs, _ = envs.reset(seed=self.seeds())
        for k in range(longest + 1):
            starting = (longest - lengths == k) & (lengths < longest)  # these envs' seeded resets come now
            if starting.any():
                obs, _ = envs.reset(seed=self.seeds(starting), options={"reset_mask": starting})
            if k == longest:
                break
            actions = [a[k - longest + n] if k >= longest - n else 0 for a, n in zip(self.actions, lengths)]
            obs, *_ = envs.step(np.array(actions, dtype=np.int64))
        if not np.array_equal(obs, expected_obs):
            raise ValueError("replaying the saved episodes did not reproduce the saved observations (different ale-py or ROM?)")
        return obs


def list_checkpoints(run_dir: str) -> list:
    return sorted(glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step_*.pt")))


def save_checkpoint(state: dict, run_dir: str, step: int, keep: int) -> str:
    """Write to a temporary name, fsync, rename: a crash mid-write leaves the previous checkpoint intact."""
    path = os.path.join(run_dir, "checkpoints", f"step_{step:012d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    for old in list_checkpoints(run_dir)[:-keep]:
        os.remove(old)
    return path


class FlagMismatch(ValueError):
    """A checkpoint of another script, or written with flags this run may not change."""


def find_checkpoint(resume: str, runs_dir: str, run_prefix: str, script: str, args: dict):
    """`auto`: the newest checkpoint of the newest unfinished run named `run_prefix*` written by `script` with `args`
    (None if there is none; runs with other flags, e.g. a shortened look at the same experiment, are skipped with a
    line saying so); a run directory: its newest checkpoint; a file: that file."""
    if resume == "auto":
        runs = [d for d in glob.glob(os.path.join(glob.escape(runs_dir), glob.escape(run_prefix) + "*"))
                if not os.path.exists(os.path.join(d, "summary.json")) and list_checkpoints(d)]
        for run in sorted(runs, key=lambda d: int(d.rsplit("__", 1)[1]), reverse=True):
            path = list_checkpoints(run)[-1]
            try:
                load_checkpoint(path, script, args, mmap=True)  # only the flags are read: tensors stay on disk
            except FlagMismatch as error:
                print(f"--resume auto: not resuming {run}: {error}", flush=True)
                continue
            return path
        return None
    if os.path.isdir(resume):
        found = list_checkpoints(resume)
        if not found:
            raise ValueError(f"--resume {resume}: the directory has no checkpoints/step_*.pt; start without --resume")
        return found[-1]
    if not os.path.isfile(resume):
        raise ValueError(f"--resume {resume}: no such checkpoint file or run directory")
    return resume


def load_checkpoint(path: str, script: str, args: dict, mmap: bool = False) -> dict:
    """Load with weights_only=True (tensors and plain containers only) and refuse other scripts or other flags. Every
    tensor comes to the CPU (RNG states and numpy views need it); networks, Adam and replay copy to their device."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a truncated zip, a bad pickle, not a torch file at all
        # torch's own messages mislead here (a garbage file: "Weights only load failed... weights_only=False")
        access = isinstance(error, (PermissionError, IsADirectoryError)) and error.strerror
        reason = access or f"truncated, corrupt or not a checkpoint: {type(error).__name__}"
        raise ValueError(f"checkpoint {path} is unreadable ({reason}); resume from an earlier one or start without --resume")
    if not isinstance(state, dict) or "script" not in state or "args" not in state:
        raise ValueError(f"{path} is not a checkpoint of this project")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format')}, this script reads format {CHECKPOINT_FORMAT}; "
                         "resume it with the version of this script that wrote it, or start a new run")
    if state["script"] != script:
        raise FlagMismatch(f"checkpoint {path} was written by {state['script']}, not {script}")
    for key, value in args.items():
        if key not in RESUMABLE_CHANGES and state["args"].get(key) != value:
            raise FlagMismatch(f"checkpoint {path} was written with --{key.replace('_', '-')} {state['args'].get(key)} "
                               f"but this run has {value}; resume with the checkpoint's flags")
    return state


def resumed_run_dir(path: str, step: int, total: int, unit: str, fix: str) -> str:
    """The run a checkpoint continues: RUN of RUN/checkpoints/step_N.pt. Refused: a file elsewhere (its grandparent
    would receive the run's files), nothing left to train, and a finished run (summary.json) resumed from a checkpoint
    before its end, which would play its last steps again and overwrite its summary and curves."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.basename(parent) != "checkpoints" or not re.fullmatch(r"step_\d+\.pt", os.path.basename(path)):
        raise ValueError(f"--resume {path}: a run continues from its own RUN/checkpoints/step_N.pt; pass that file or "
                         "the run directory RUN")
    run_dir = os.path.dirname(os.path.dirname(path)) or os.curdir
    finished = None
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        try:
            with open(os.path.join(run_dir, "summary.json")) as f:
                finished = int(json.load(f)["global_step"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{os.path.join(run_dir, 'summary.json')} is unreadable ({type(error).__name__}); "
                             "restore it or start a new run")
    if finished is not None and step < finished:
        raise ValueError(f"run {run_dir} finished at {unit} {finished} but checkpoint {path} is at {unit} {step}: "
                         "resuming would play the steps after it again and overwrite the finished run's summary and "
                         f"curves; resume from a checkpoint at {unit} {finished} or start a new run")
    # at the last step without its summary.json (one of an earlier, shorter end may exist): stopped during the final
    # evaluation or saving, which resume finishes
    if step > total or (step == total and finished == step):
        raise ValueError(f"checkpoint {path} is at {unit} {step}, not below {fix}")
    return run_dir


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, device: torch.device) -> None:
    """Adam's saved state. torch.compile sets `capturable` on CUDA; resumed on the CPU, step() would refuse it."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["capturable"] = bool(group.get("capturable")) and device.type == "cuda"


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """A sampler's saved RNG state. One saved on the other device (--cuda changed on resume) does not fit: a new stream
    is seeded from it instead, so the run goes on but no longer matches an uninterrupted one."""
    if state.numel() == generator.get_state().numel():
        generator.set_state(state)
    else:
        generator.manual_seed(zlib.crc32(state.numpy().tobytes()))


class StopRequest:
    """SIGTERM, SIGUSR1 or SIGUSR2 (what Slurm and submitit send before preemption) only set a flag: the current
    step finishes, then the loop writes a checkpoint and exits with EXIT_PREEMPTED."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
# === end shared ===


def check_args(args: Args) -> None:
    """Refuse flag combinations that cannot work, each with one sentence naming the flag and the fix."""
    if args.compile_mode != "default" and not args.compile:
        raise ValueError(f"--compile-mode {args.compile_mode} applies to --compile; add --compile")
    if args.compile_mode == "reduce-overhead" and not (args.cuda and torch.cuda.is_available()):
        raise ValueError("--compile-mode reduce-overhead captures CUDA graphs and needs a GPU; on the CPU use --compile "
                         "alone")
    if args.tf32 and not (args.cuda and torch.cuda.is_available()):
        raise ValueError("--tf32 applies to NVIDIA GPUs and this run is on the CPU; drop --tf32")
    if args.gpu_replay_fraction is not None and not (args.cuda and torch.cuda.is_available()):
        raise ValueError("--gpu-replay-fraction splits the replay between a GPU and host memory and this run is on the "
                         "CPU; drop --gpu-replay-fraction")
    if args.gpu_replay_fraction is not None and not 0 <= args.gpu_replay_fraction <= 1:
        raise ValueError(f"--gpu-replay-fraction must be in [0, 1], got {args.gpu_replay_fraction}")
    positive = ["num_envs", "total_timesteps", "iteration_steps", "buffer_size", "n_step", "batch_size",
                "target_network_frequency", "num_experts", "expert_hidden", "encoder_scale", "log_every", "print_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "metrics_every", "eval_episodes", "eval_every", "load_balancing_coef", "checkpoint_every"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.checkpoint_keep < 1:
        raise ValueError(f"--checkpoint-keep must be at least 1, got {args.checkpoint_keep}")
    if not args.exp_name or "/" in args.exp_name or os.sep in args.exp_name or "__" in args.exp_name:
        raise ValueError(f"--exp-name {args.exp_name!r} must be a non-empty name without '/' or '__' (run directories are "
                         "named game__exp-name__seed__time)")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2^32 - 1] (numpy's seeds), got {args.seed}")
    if args.eval_episodes == 0 and args.eval_epsilon != Args.eval_epsilon:
        raise ValueError(f"--eval-epsilon {args.eval_epsilon} applies to evaluation games and --eval-episodes is 0; "
                         "drop --eval-epsilon or set --eval-episodes")
    if args.batch_size > args.buffer_size:
        raise ValueError(f"--batch-size {args.batch_size} exceeds --buffer-size {args.buffer_size}: every batch would "
                         "repeat transitions; lower --batch-size or raise --buffer-size")
    if args.iteration_steps > args.total_timesteps and args.iteration_steps != Args.iteration_steps:
        raise ValueError(f"--iteration-steps {args.iteration_steps} exceeds --total-timesteps {args.total_timesteps}: "
                         "no iteration would end (charts/iteration_return); lower --iteration-steps")
    if args.eval_every > args.total_timesteps:
        raise ValueError(f"--eval-every {args.eval_every} exceeds --total-timesteps {args.total_timesteps}: only the "
                         "final evaluation would run; lower --eval-every or drop it")
    if args.replay_ratio <= 0:
        raise ValueError(f"--replay-ratio must be positive, got {args.replay_ratio}")
    if not 0 <= args.end_e <= args.start_e <= 1 or not 0 <= args.eval_epsilon <= 1:
        raise ValueError("epsilons must satisfy 0 <= --end-e <= --start-e <= 1 and 0 <= --eval-epsilon <= 1")
    if args.exploration_steps <= 0:
        raise ValueError(f"--exploration-steps must be positive, got {args.exploration_steps}")
    defaults = Args()
    if args.noisy and any(getattr(args, k) != getattr(defaults, k) for k in ["start_e", "end_e", "exploration_steps"]):
        raise ValueError("--start-e, --end-e and --exploration-steps apply only with --no-noisy (noisy nets explore "
                         "at the constant --noisy-epsilon); drop them or add --no-noisy")
    if not 0 <= args.noisy_epsilon <= 1:
        raise ValueError(f"--noisy-epsilon must be in [0, 1], got {args.noisy_epsilon}")
    if not args.noisy and args.noisy_epsilon:
        raise ValueError("--noisy-epsilon applies to noisy nets; with --no-noisy set --start-e, --end-e and "
                         "--exploration-steps")
    if not 0 < args.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {args.gamma}")
    if args.learning_rate <= 0 or args.adam_eps <= 0:
        raise ValueError("--learning-rate and --adam-eps must be positive")
    if args.num_atoms < 2:
        raise ValueError(f"--num-atoms must be at least 2 for a C51 distribution, got {args.num_atoms}")
    if not args.v_min < args.v_max:
        raise ValueError(f"--v-min ({args.v_min}) must be below --v-max ({args.v_max}); the paper uses -10 and 10")
    if replay_slots(args) // args.num_envs <= args.n_step + 4:
        raise ValueError(f"--buffer-size {args.buffer_size} with --total-timesteps {args.total_timesteps} leaves too few "
                         f"replay slots per env for {args.num_envs} envs and n-step {args.n_step}")
    if args.eval_every > 0 and args.eval_episodes == 0:
        raise ValueError(f"--eval-every {args.eval_every} needs --eval-episodes above 0; drop --eval-every or raise it")
    if args.expert_hidden_divide and args.expert_hidden % args.num_experts:
        raise ValueError(f"--expert-hidden-divide needs --expert-hidden ({args.expert_hidden}) divisible by --num-experts")
    if args.encoder == "nature" and (args.encoder_scale != 1 or args.impala_filter_size != 3):
        raise ValueError("--encoder-scale and --impala-filter-size apply to the Impala encoder; drop them or use --encoder impala")
    if args.moe_type != "softmoe" and (args.random_phi or args.moe_l2_norm):
        raise ValueError(f"--random-phi and --moe-l2-norm are Soft MoE options; use --moe-type softmoe, not {args.moe_type}")
    if args.moe_type != "top1" and args.load_balancing_coef > 0:
        raise ValueError(f"--load-balancing-coef applies to --moe-type top1, not {args.moe_type}")
    if args.moe_type == "baseline" and (args.tokenization != "perconv" or args.expert_hidden_divide):
        raise ValueError("--tokenization and --expert-hidden-divide need an MoE; the baseline has no tokens or experts")
    if args.expert_variant != "regular" and (args.moe_type != "softmoe" or args.tokenization != "perconv"):
        raise ValueError(f"--expert-variant {args.expert_variant} is a Soft MoE routing whole inputs as PerSamp tokens; "
                         "use --moe-type softmoe and leave --tokenization at its default")


def replay_slots(args: Args) -> int:
    """Replay capacity to allocate, in transitions: an env writes one slot per agent step and one per reset step, and
    each reset follows an episode of at least one played step, so a run never writes more than 2 x --total-timesteps
    slots: a 100k run holds 1.41 GB instead of the 7.06 GB of 1M slots. Three spare slots per env keep the oldest stack
    from ever counting as overwritten, so sampling is exactly that of the 1M replay, which never wraps either. No-op
    steps write no slot with one env; with several, one each while another env plays, within the bound as long as
    games last 30 agent steps or more (2 s of play)."""
    return min(args.buffer_size // args.num_envs, 2 * -(-args.total_timesteps // args.num_envs) + 3) * args.num_envs


def load_replay(rb, state: dict) -> None:
    """Load a checkpoint's replay into `rb`, whose capacity differs from the saved one's when --total-timesteps changed
    on resume. The saved replay then never wrapped (`replay_slots`), so every slot keeps its place; the sum tree is
    rebuilt from the saved leaves, and as each node is the sum of its two children, it samples exactly as the saved one."""
    if not isinstance(rb, PrioritizedReplayBuffer) or state["tree"].shape == rb.tree.nodes.shape:
        rb.load_state_dict(state)
        return
    ReplayBuffer.load_state_dict(rb, state)
    leaves = state["tree"][state["tree"].shape[0] // 2:]  # priorities of the saved slots, zero beyond the written ones
    rebuild_tree(rb.tree, leaves[: rb.tree.first_leaf].to(rb.device))
    rb.max_priority = state["max_priority"].to(rb.device)


def rebuild_tree(tree: SumTree, leaves: torch.Tensor) -> None:
    """Set the tree's first leaves to `leaves` and the others to 0, then recompute every node as the sum of its two
    children, from the leaves up: the sums `update` keeps, without its K x K check for repeated leaves (all 2^18 leaves
    of a 100k run's replay: 64 GiB)."""
    tree.nodes.zero_()
    tree.nodes[tree.first_leaf: tree.first_leaf + len(leaves)] = leaves.to(tree.nodes.dtype)
    level = tree.first_leaf  # the nodes of one level are [level, 2 * level)
    while level > 1:
        tree.nodes[level // 2: level] = tree.nodes[level: 2 * level].view(-1, 2).sum(1)
        level //= 2


def linear_schedule(start_e: float, end_e: float, duration: int, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


# === shared: c51 ===
def project_distribution(target_support: torch.Tensor, probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The categorical projection of C51 (Bellemare et al. 2017, Algorithm 1), vectorised over batch and atoms.

    Atom j of sample b carries probs[b, j] at return target_support[b, j]; clipped to [v_min, v_max], its mass is
    split between the two nearest atoms of the fixed, evenly spaced `support` (N,), in proportion to closeness.
    Returns (B, N).
    """
    num_atoms = support.shape[0]
    v_min, v_max = support[0], support[-1]
    position = (target_support.clamp(v_min, v_max) - v_min) / ((v_max - v_min) / (num_atoms - 1))
    position = position.clamp(0, num_atoms - 1)  # rounding must not push v_max past the last atom
    lower, upper = position.floor(), position.ceil()
    on_atom = (lower == upper).to(probs.dtype)  # exactly on an atom: all the mass stays there
    projected = torch.zeros(probs.shape[0], num_atoms, dtype=probs.dtype, device=probs.device)
    projected = projected.scatter_add(1, lower.long(), probs * (upper - position + on_atom))
    return projected.scatter_add(1, upper.long(), probs * (position - lower))


def expected_q(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Q-values (..., A) of log-probabilities (..., A, N) over `support`: the mean of each return distribution."""
    return (log_probs.exp() * support).sum(-1)


def share_noise(networks, share: bool) -> None:
    """While `share`, each noisy layer uses one noise draw for the whole batch, and layer k of every network (copies of
    one architecture) the same draw: Dopamine's `target_output` gives both networks one key for the batch."""
    layers = [[m for m in net.modules() if hasattr(m, "draw_shared_noise")] for net in networks]
    for group in zip(*layers, strict=True):
        noise = group[0].draw_shared_noise() if share else None
        for layer in group:
            layer.shared_noise = noise


def c51_target(online, target, next_states, returns, discounts, support, double_q=True) -> torch.Tensor:
    """Target distributions (B, N) for n-step transitions: the target network's distribution at the next action,
    moved to returns + discounts * z (discounts = gamma^steps, 0 after a terminal) and projected on the support.
    The next action is the argmax of the online network's Q with double-Q, of the target network's without.
    Noisy nets: one draw for the batch, the same in both networks (`share_noise`), as Dopamine."""
    with torch.no_grad():
        share_noise((online, target), True)
        try:
            target_log_probs = target(next_states)  # (B, A, N)
            chooser = online(next_states) if double_q else target_log_probs
        finally:
            share_noise((online, target), False)
        next_actions = expected_q(chooser, support).argmax(1)
        index = next_actions[:, None, None].expand(-1, 1, support.shape[0])
        next_probs = target_log_probs.exp().gather(1, index).squeeze(1)  # (B, N)
        return project_distribution(returns[:, None] + discounts[:, None] * support, next_probs, support)


def c51_sample_loss(q_fn, state, action, target):
    """Per-sample C51 loss (q_fn, state, action, target distribution) -> cross-entropy, for the empirical NTK."""
    log_probs = q_fn(state)  # (A, N)
    return -(target * log_probs.gather(0, action.view(1, 1).expand(1, log_probs.shape[1])).squeeze(0)).sum()
# === end shared ===


def rainbow_loss(q_network, target_network, batch, args, weights):
    """C51 cross-entropy of full Rainbow on a sampled batch (SPEC §4), each sample weighted by its importance weight.

    Returns (loss, per-sample losses, aux_loss, mean Q of the taken actions): loss = mean(weights * per-sample
    cross-entropy), as Dopamine; the per-sample losses become the new priorities; aux_loss is Top1's load balancing,
    else 0.
    """
    states, actions, returns, discounts, next_states = batch
    target = c51_target(q_network, target_network, next_states, returns, discounts, q_network.support, args.double_q)
    log_probs, info = q_network(states, return_info=True)
    taken = log_probs.gather(1, actions[:, None, None].expand(-1, 1, log_probs.shape[-1])).squeeze(1)  # (B, N)
    sample_losses = -(target * taken).sum(-1)
    q_taken = expected_q(taken.detach(), q_network.support)
    aux_loss = info.get("aux_loss", torch.zeros((), device=states.device))
    return (weights * sample_losses).mean(), sample_losses, aux_loss, q_taken.mean()


# === shared: evaluate ===
def evaluate(model, rom: str, episodes: int, epsilon: float, device, seed: int, stop=None) -> tuple[list, list] | None:
    """Atari 100k evaluation (SPEC §4): `episodes` games at once in one vector env of their own on the atari100k
    protocol, each played from its no-op start (`NoopStarts`) to its first game over or truncation; a life loss ends
    nothing but restarts the acting stack, as in training. Epsilon-greedy on `model.q_values` in eval mode (noisy nets
    off); the training's torch RNG is left as it was. Returns each game's score and length in agent steps, or None
    when `stop` (a StopRequest) got a signal first: the games are abandoned so that the run can checkpoint within
    Slurm's grace time."""
    envs = make_env(rom, episodes, "atari100k")
    obs, info = envs.reset(seed=np.array([episode_seed(seed, e, 0) for e in range(episodes)], dtype=np.int64))
    lives, rng, noops = LifeLoss(info["lives"]), np.random.default_rng(seed), NoopStarts(episodes)
    noops.start(np.ones(episodes, dtype=bool), rng)
    scores, lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
    finished = np.zeros(episodes, dtype=bool)
    model.eval()
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        while not finished.all() and not (stop is not None and stop.signal):
            nooping = noops.step()  # a game that ends in its no-ops (ale-py resets it) goes on with the next one
            playing = ~finished & ~nooping
            actions = rng.integers(envs.single_action_space.n, size=episodes)
            greedy = np.zeros(episodes, dtype=np.int64)
            if playing.any():  # only the games playing an agent step need the network
                with torch.no_grad():
                    q = model.q_values(torch.as_tensor(lives.acting(obs)[playing], device=device))
                greedy[playing] = q.argmax(1).cpu().numpy()
            actions = np.where(nooping, 0, np.where(rng.random(episodes) < epsilon, actions, greedy))
            obs, rewards, terminations, truncations, info = envs.step(actions)
            lives.step(info["lives"], terminations, nooping)
            scores += rewards * playing
            lengths += playing
            finished |= (terminations | truncations) & playing
    model.train()
    envs.close()
    return (scores.tolist(), lengths.tolist()) if finished.all() else None
# === end shared ===


def build_agent(args: Args, num_actions: int, device: torch.device) -> types.SimpleNamespace:
    """What main() trains: networks, Adam, the replay memory, greedy acting and one gradient update.

    `update()` samples a batch (by priority with --prioritized), takes one Adam step and sets the sampled
    transitions' new priorities, without synchronising with the host (the training step is compiled with
    --compile). benchmark/speed.py and the tests time and check exactly this.
    """
    if device.type == "cuda":  # PyTorch lets cuDNN convolutions use TF32 by default: pin matmuls and convs to --tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    # oneDNN runs convolutions and max-pools on channels-last tensors much faster (the Impala update ~1.4x here);
    # on a GPU cuDNN keeps its own choice (channels-last not measured there)
    memory_format = torch.channels_last if device.type == "cpu" else torch.preserve_format
    q_network = QNetwork(args, num_actions).to(device, memory_format=memory_format)
    target_network = QNetwork(args, num_actions).to(device, memory_format=memory_format)
    target_network.load_state_dict(q_network.state_dict())  # stays in training mode: its noise is on (Dopamine)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    replay = PrioritizedReplayBuffer if args.prioritized else ReplayBuffer
    capacity = replay_slots(args)
    with gpu_lock(device):  # SPEC §5: the whole replay on the GPU, or as much as fits
        device_slots = check_replay_memory(args, capacity, replay.nbytes(capacity)) if device.type == "cuda" else None
        rb = replay(capacity, args.num_envs, device, args.n_step, args.gamma, seed=args.seed,
                    device_slots=device_slots)
    uniform_weights = torch.ones(args.batch_size, device=device)

    def train_step(states, actions, returns, discounts, next_states, weights):
        batch = (states, actions, returns, discounts, next_states)
        loss, sample_losses, aux_loss, q_mean = rainbow_loss(q_network, target_network, batch, args, weights)
        optimizer.zero_grad(set_to_none=False)
        (loss + args.load_balancing_coef * aux_loss).backward()
        optimizer.step()
        return loss.detach(), sample_losses.detach(), aux_loss.detach(), q_mean

    train_step = torch.compile(train_step, mode=args.compile_mode) if args.compile else train_step
    if args.compile_mode == "reduce-overhead":  # CUDA graphs replay into the same memory: copy each step's outputs out
        graphed = train_step

        def train_step(*batch):
            torch.compiler.cudagraph_mark_step_begin()
            return tuple(t.clone() for t in graphed(*batch))

    def update():
        idx, env_ids = rb.sample_indices(args.batch_size)
        weights = rb.importance_weights(idx, env_ids) if args.prioritized else uniform_weights
        loss, sample_losses, aux_loss, q_mean = train_step(*rb.gather(idx, env_ids), weights)
        if args.prioritized:  # the sampled transitions' new priorities (Dopamine: after every update)
            rb.update_priorities(idx, env_ids, sample_losses)
        return loss, aux_loss, q_mean

    def policy(network: nn.Module, states: torch.Tensor) -> torch.Tensor:
        return network.q_values(states).argmax(1)  # training mode: noise per env's state

    act = Actor(q_network, policy, args.lagged_actor, graphs=args.compile_mode == "reduce-overhead")

    if args.compile:  # sampling, batch assembly and acting: fused kernels instead of hundreds of small ones
        rb.compile()
        act.policy = torch.compile(policy, dynamic=False)

    return types.SimpleNamespace(q_network=q_network, target_network=target_network, optimizer=optimizer, rb=rb,
                                 update=update, act=act)


# === shared: gpu_memory ===
def available_memory(device) -> tuple[int, str]:
    """Bytes free for the replay on `device`, and where."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU memory is free"
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024, "host memory is available"
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory is available"


@contextlib.contextmanager
def gpu_lock(device):
    """Runs sharing a GPU (benchmark/run.py --jobs, --runs-per-job) place their replays one at a time, each seeing the
    memory the ones before it took: an exclusive lock on a file named after the GPU (none on the CPU)."""
    if device.type != "cuda":
        yield
        return
    name = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "any")
    try:
        lock = open(os.path.join(tempfile.gettempdir(), f"softmoe-gpu-{name}.lock"), "a")
    except OSError:  # another user's lock file: place without it
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield
# === end shared ===


# === shared: check_replay_memory ===
def check_replay_memory(args: Args, capacity: int, nbytes: int) -> int | None:
    """Where the replay lives (SPEC §5: on the GPU, all of it or as much as fits): the slots per env whose frames the
    GPU keeps, `ReplayBuffer`'s device_slots (None: all of them, or no GPU). A replay that GPU and host memory cannot
    hold (with a GiB to spare for the networks, the batches and the emulators) is refused in one line, before the run
    starts, instead of an out-of-memory traceback (or the kernel's OOM killer) hours in."""
    host_free, where = available_memory(torch.device("cpu"))
    if not (args.cuda and torch.cuda.is_available()):
        if nbytes + 2**30 > host_free:
            raise ValueError(f"the replay of {capacity:,} transitions needs {nbytes / 1e9:.2f} GB but "
                             f"{host_free / 1e9:.1f} GB of {where}; lower --buffer-size")
        return None
    gpu_free = available_memory(torch.device("cuda"))[0]
    slots, slot_bytes = capacity // args.num_envs, args.num_envs * 84 * 84  # a slot's frames, one per env
    rest = nbytes - slots * slot_bytes  # actions, rewards, flags (and the sum tree): always on the GPU
    if args.gpu_replay_fraction is not None:
        near = int(args.gpu_replay_fraction * slots)
        if rest + near * slot_bytes + 2**30 > gpu_free:
            raise ValueError(f"--gpu-replay-fraction {args.gpu_replay_fraction} keeps "
                             f"{(rest + near * slot_bytes) / 1e9:.2f} GB of the replay on the GPU; with a GiB to spare "
                             f"that exceeds the {gpu_free / 1e9:.1f} GB of GPU memory free; lower --gpu-replay-fraction")
    elif nbytes + 2**30 <= gpu_free:
        near = slots
    elif rest + 2**30 > gpu_free:
        raise ValueError(f"{gpu_free / 1e9:.1f} GB of GPU memory is free, too little for the networks and the replay's "
                         f"{rest / 1e6:.1f} MB of actions, rewards and flags; free the GPU or run with --no-cuda")
    else:
        near = min((gpu_free - 2**30 - rest) // slot_bytes, slots)
    host = (slots - near) * slot_bytes
    if host and host + 2**30 > host_free:
        raise ValueError(f"the replay of {capacity:,} transitions needs {nbytes / 1e9:.2f} GB: the GPU holds "
                         f"{(nbytes - host) / 1e9:.2f} GB, and the other {host / 1e9:.2f} GB and a GiB to spare exceed "
                         f"the {host_free / 1e9:.1f} GB of host memory available; lower --buffer-size")
    return None if near >= slots else near
# === end shared ===


def prepare(args: Args):
    """Every check of the user's input, before anything is created or overwritten.

    Returns the ROM id, the run directory (new, or the one being resumed) and the checkpoint to resume from (or None).
    """
    rom = resolve_rom(args.env_id)
    check_args(args)
    replay = PrioritizedReplayBuffer if args.prioritized else ReplayBuffer
    check_replay_memory(args, replay_slots(args), replay.nbytes(replay_slots(args)))
    prefix = f"{game_name(rom)}__{args.exp_name}__{args.seed}__"
    script = os.path.basename(__file__)
    path = find_checkpoint(args.resume, args.runs_dir, prefix, script, vars(args)) if args.resume else None
    checkpoint = None
    if path:
        checkpoint = load_checkpoint(path, script, vars(args))
        run_dir = resumed_run_dir(path, checkpoint["global_step"], args.total_timesteps, "agent step",
                                  f"--total-timesteps {args.total_timesteps}; raise --total-timesteps to train further")
    else:
        stamp = int(time.time())
        while os.path.exists(os.path.join(args.runs_dir, f"{prefix}{stamp}")):
            stamp += 1
        run_dir = os.path.join(args.runs_dir, f"{prefix}{stamp}")
    if args.save_replay:  # found out now, not after hours of training; creates nothing (the run directory may fail)
        existing = os.path.abspath(args.save_replay)
        while not os.path.exists(existing):  # its nearest existing ancestor must take a file
            existing = os.path.dirname(existing)
        try:
            if not os.path.isdir(existing):
                raise NotADirectoryError(20, "not a directory", existing)
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as error:
            raise ValueError(f"cannot write --save-replay {args.save_replay} ({error.strerror}); choose a writable directory")
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, ".write_test"), "w"):
            pass
        os.remove(os.path.join(run_dir, ".write_test"))
    except OSError as error:
        raise ValueError(f"cannot write the run directory {run_dir} ({error.strerror}); pass a writable --runs-dir")
    return rom, run_dir, checkpoint


def main(args: Args, rom: str, run_dir: str, checkpoint=None) -> None:
    script = os.path.basename(__file__)
    stop = StopRequest()  # from the start: a signal during set-up still ends in a checkpoint and exit 75
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(args.seed)

    envs = make_env(rom, args.num_envs, "atari100k")
    tracker, noops = EnvTracker(args.seed, args.num_envs), NoopStarts(args.num_envs)
    num_actions = int(envs.single_action_space.n)  # a plain int: model.pt loads with weights_only=True
    capacity = replay_slots(args)  # a resume with another --total-timesteps loads the saved replay into this size
    agent = build_agent(args, num_actions, device)
    q_network, target_network, optimizer, rb = agent.q_network, agent.target_network, agent.optimizer, agent.rb
    replay = type(rb)

    global_step, update_credit, iteration_returns, evaluations = 0, 0.0, [], []
    pending_evaluation = False  # a signal interrupted the evaluation at global_step: it is played again on resume
    episode_return, episode_length = np.zeros(args.num_envs), np.zeros(args.num_envs, dtype=np.int64)
    was_done = np.zeros(args.num_envs, dtype=bool)  # these envs' next step is a reset step (next-step autoreset)
    if checkpoint is None:
        obs, info = envs.reset(seed=tracker.seeds())
        lives = LifeLoss(info["lives"])
        noops.start(np.ones(args.num_envs, dtype=bool), rng)
    else:  # continue exactly where the checkpoint left off
        q_network.load_state_dict(checkpoint["q_network"])
        agent.act.load_state_dict(checkpoint["actor"])
        target_network.load_state_dict(checkpoint["target_network"])
        load_optimizer(optimizer, checkpoint["optimizer"], device)
        if checkpoint["replay"] is not None:
            load_replay(rb, checkpoint["replay"])
        loop = checkpoint["loop"]
        global_step, update_credit, iteration_returns = checkpoint["global_step"], loop["update_credit"], loop["iteration_returns"]
        episode_return, episode_length = loop["episode_return"].numpy(), loop["episode_length"].numpy()
        was_done, evaluations = loop["was_done"].numpy(), loop["evaluations"]
        pending_evaluation = loop.get("pending_evaluation", False)
        lives = LifeLoss(np.zeros(args.num_envs))
        lives.load_state_dict(loop["lives"])
        noops.load_state_dict(loop["noops"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"]["cuda"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"][0], device)
        rng.bit_generator.state = checkpoint["rng"]["numpy"]
        obs = tracker.restore(envs, checkpoint["envs"], checkpoint["obs"].numpy())
    # purge_step hides what a stopped run logged after its checkpoint (all logged at steps above the checkpoint's)
    writer = SummaryWriter(run_dir, purge_step=global_step + 1 if checkpoint else None)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    print(f"{run_dir}: {rom}, {num_actions} actions, {sum(p.numel() for p in q_network.parameters()):,} parameters, "
          f"device {device}, replay {capacity:,} transitions = {replay.nbytes(capacity) / 1e9:.2f} GB"
          + (f" ({rb.host_frames.nbytes / 1e9:.2f} GB of frames in host memory)" if rb.host_frames is not None else "")
          + (", --compile: the first updates and actions compile, a minute or more" if args.compile else "")
          + (f", resumed at agent step {global_step}" if checkpoint else ""), flush=True)
    if args.resume == "auto" and checkpoint is None:
        print("--resume auto: no unfinished run of this game, exp_name and seed has a checkpoint; starting a new run", flush=True)

    def checkpoint_state() -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "script": script, "args": vars(args), "global_step": global_step,
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "actor": agent.act.state_dict(),  # None unless --lagged-actor
            "optimizer": optimizer.state_dict(), "replay": rb.state_dict() if args.checkpoint_replay else None,
            "envs": tracker.state_dict(), "obs": torch.as_tensor(obs),
            "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
                    "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []},
            "loop": {"update_credit": update_credit, "iteration_returns": list(iteration_returns),
                     "episode_return": torch.as_tensor(episode_return), "episode_length": torch.as_tensor(episode_length),
                     "was_done": torch.as_tensor(was_done), "lives": lives.state_dict(), "noops": noops.state_dict(),
                     "evaluations": list(evaluations), "pending_evaluation": pending_evaluation},
        }

    nonfinite_at = torch.full((), -1, dtype=torch.long, device=device)  # first agent step with a non-finite loss

    def stop_if_nonfinite(check_parameters=False):
        """One host sync, only when logging or checkpointing: a NaN or inf ends the run without saving it."""
        step = int(nonfinite_at)
        if step < 0 and check_parameters and not torch.stack([torch.isfinite(p).all() for p in q_network.parameters()]).all():
            step = global_step
        if step >= 0:
            last = list_checkpoints(run_dir)
            hint = f"the last good checkpoint is {last[-1]} (continue from it with --resume)" if last else "there is no checkpoint"
            print(f"{script}: error: non-finite TD loss, Q-value or weights by agent step {step}; stopped without "
                  f"saving; {hint}", file=sys.stderr)
            writer.close()
            sys.exit(EXIT_NONFINITE)

    def exit_preempted(path: str) -> None:
        progress.close()
        print(f"{stop.signal} at agent step {global_step}: checkpoint written to {path}; "
              "continue with --resume auto", flush=True)
        writer.close()
        sys.exit(EXIT_PREEMPTED)

    def run_evaluation() -> dict:
        """`eval_episodes` games with epsilon 0.001 and noise off, logged at this agent step (Atari 100k)."""
        nonlocal pending_evaluation
        print(f"evaluating {args.eval_episodes} games at agent step {global_step}", flush=True)
        played = evaluate(q_network, rom, args.eval_episodes, args.eval_epsilon, device,
                          episode_seed(args.seed + 100, 0, global_step), stop)
        pending_evaluation = played is None
        if pending_evaluation:  # a signal: checkpoint now, the same evaluation (same network, seed) is played on resume
            stop_if_nonfinite(check_parameters=True)
            exit_preempted(save_checkpoint(checkpoint_state(), run_dir, global_step, args.checkpoint_keep))
        scores, lengths = played
        # the mean over the games (SPEC §4); each game's return goes to summary.json
        writer.add_scalar("eval/episodic_return", float(np.mean(scores)), global_step)
        normalized = human_normalized_score(rom, scores)
        if normalized is not None:
            writer.add_scalar("eval/human_normalized_score", normalized, global_step)
        print(f"evaluation at agent step {global_step} over {len(scores)} episodes: mean return {np.mean(scores):.1f}"
              + (f", human-normalised score {normalized:.3f}" if normalized is not None else ""), flush=True)
        return {"step": global_step, "returns": scores, "lengths": lengths, "human_normalized_score": normalized}

    td_loss = None
    progress = Progress(args.total_timesteps, args.print_every, global_step)
    if not args.eval_episodes:  # resumed with --eval-episodes 0: an interrupted evaluation is dropped too
        pending_evaluation = False
    if pending_evaluation and global_step < args.total_timesteps:  # interrupted during training: played first
        evaluations.append(run_evaluation())
    start_time, last_log = time.time(), (global_step, time.time())  # SPS counts training only
    while global_step < args.total_timesteps:
        # act: noisy nets explore by themselves, at the constant --noisy-epsilon from the first step (0, SPEC §4; the
        # official agent: 0.01); without them, epsilon 1 during the warm-up, then linear over `exploration_steps`.
        # The acting stack holds no frames of earlier lives, as the replay's.
        if args.noisy:
            epsilon = args.noisy_epsilon
        else:
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_steps, global_step - args.learning_starts)
            epsilon = args.start_e if global_step < args.learning_starts else epsilon
        nooping = noops.step()  # a game's first 0-29 steps are NOOPs (Dopamine's runner): nothing to choose there
        actions = rng.integers(num_actions, size=args.num_envs)
        if epsilon < 1.0 and not nooping.all():
            greedy = agent.act(lives.acting(obs))
            actions = np.where(rng.random(args.num_envs) < epsilon, actions, greedy)
        actions = np.where(nooping, 0, actions)
        tracker.send(envs, actions)  # the emulators step in ale-py's threads while the learner updates below
        # no agent steps: an env's reset step (its game ended last step: ale-py ignores the action and plays no
        # frame) and its no-op steps
        skipped = was_done | nooping
        stepped = args.num_envs - int(skipped.sum())
        previous_step, global_step = global_step, global_step + stepped  # everything below is logged at this step
        rb.flush()  # the previous step's slot is written now, while the emulators step (see `rb.add` below)

        # learn: `replay_ratio` gradient updates per agent step once the replay holds `learning_starts` slots (the
        # transition in flight joins the replay after them: a one-step lag that lets learning overlap acting; a
        # reset step's slot counts, a no-op step's not; Dopamine's add_count counts 3 padding rows per terminal, here each
        # life lost too, so its warm-up ends a little sooner)
        if rb.t * args.num_envs - noops.slots > args.learning_starts and rb.can_sample():
            update_credit += args.replay_ratio * stepped
            if update_credit >= 1.0:
                agent.act.refresh()  # --lagged-actor: the actor keeps the parameters from before this round
            while update_credit >= 1.0:
                update_credit -= 1.0
                td_loss, aux_loss, q_mean = agent.update()
                finite = torch.isfinite(td_loss) & torch.isfinite(q_mean)
                nonfinite_at = torch.where((nonfinite_at < 0) & ~finite, global_step, nonfinite_at)
            if global_step // args.target_network_frequency != previous_step // args.target_network_frequency:
                target_network.load_state_dict(q_network.state_dict())

        next_obs, rewards, terminations, truncations, info = envs.recv()
        terminals = lives.step(info["lives"], terminations, skipped)  # game over or life lost: stop bootstrapping
        done = terminations | truncations  # only a game over (or the frame cap) ends the episode
        # store one frame per env; at a reset step that frame is the final observation of the ended episode, at a
        # no-op step one no transition uses (`last` too); a step of no-ops only is not stored (one env: no no-op slots)
        if not nooping.all():
            rb.add(obs[:, -1], actions, rewards, terminals, skipped, defer=True)  # off the path from recv to send
            noops.slots += int(nooping.sum())
        episode_return += rewards * ~nooping
        episode_length += ~skipped
        ended = done & ~nooping  # a game over during the no-ops is no episode: ale-py resets the game, no-ops again
        finished = episode_return[ended].tolist()
        for i in np.flatnonzero(ended):  # the whole game's score, all lives
            writer.add_scalar("charts/episodic_return", episode_return[i], global_step)
            writer.add_scalar("charts/episodic_length", episode_length[i], global_step)
        episode_return[done], episode_length[done] = 0.0, 0
        iteration_returns += finished
        noops.start(was_done, rng)  # the envs whose reset step this was begin a game, with its no-ops
        obs, was_done = tracker.reset_ended(envs, was_done, next_obs), done

        # log
        if global_step // args.log_every != previous_step // args.log_every:
            stop_if_nonfinite()
            sps = (global_step - last_log[0]) / max(time.time() - last_log[1], 1e-9)
            last_log = (global_step, time.time())
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            if td_loss is not None:
                writer.add_scalar("losses/td_loss", td_loss.item(), global_step)
                writer.add_scalar("losses/q_values", q_mean.item(), global_step)
                if args.load_balancing_coef > 0:
                    writer.add_scalar("losses/aux_loss", aux_loss.item(), global_step)
        if global_step // args.iteration_steps != previous_step // args.iteration_steps:
            if iteration_returns:  # the paper's training curves: mean return of the episodes ended in each iteration
                writer.add_scalar("charts/iteration_return", np.mean(iteration_returns), global_step)
            iteration_returns = []
        if args.metrics_every and global_step // args.metrics_every != previous_step // args.metrics_every and rb.can_sample():
            states, actions_b, returns_b, discounts_b, next_states = rb.sample(args.batch_size)
            targets = c51_target(q_network, target_network, next_states, returns_b, discounts_b, q_network.support,
                                 args.double_q)
            metrics = analysis_metrics(q_network, states, c51_sample_loss, (states, actions_b, targets))
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step)
        # evaluate during training (the final evaluation comes after the loop)
        if (args.eval_every and global_step // args.eval_every != previous_step // args.eval_every
                and global_step < args.total_timesteps):
            stop_if_nonfinite()
            evaluations.append(run_evaluation())
            last_log = (global_step, time.time())  # SPS counts training only
        progress.update(global_step, finished)

        # checkpoint: every `checkpoint_every` steps, and when Slurm or the user asks the run to stop
        periodic = args.checkpoint_every and global_step // args.checkpoint_every != previous_step // args.checkpoint_every
        if periodic or stop.signal:
            stop_if_nonfinite(check_parameters=True)
            path = save_checkpoint(checkpoint_state(), run_dir, global_step, args.checkpoint_keep)
            if stop.signal:
                exit_preempted(path)

    progress.close()
    envs.close()
    stop_if_nonfinite(check_parameters=True)
    print(f"done: {global_step} agent steps in {time.time() - start_time:.0f}s", flush=True)
    final = {"returns": [], "human_normalized_score": None}
    if args.eval_episodes > 0:  # first: a signal during it checkpoints, and nothing below is written twice
        final = run_evaluation()
        evaluations.append(final)
    if args.save_replay:
        print(f"replay written to {', '.join(save_replay_dataset(rb, args.save_replay, game_name(rom)))}", flush=True)
    if args.save_model:
        path = os.path.join(run_dir, "model.pt")
        torch.save({"model": {k: v.cpu() for k, v in q_network.state_dict().items()}, "args": vars(args),
                    "num_actions": num_actions}, path)
        print(f"model saved to {path}", flush=True)
    writer.close()
    summary = {"script": script, "game": game_name(rom), "exp_name": args.exp_name, "seed": args.seed,
               "global_step": global_step, "wall_time_s": time.time() - start_time, "eval_returns": final["returns"],
               "eval_human_normalized_score": final["human_normalized_score"], "evaluations": evaluations,
               "args": vars(args), **peak_memory(device)}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:  # written last: marks a finished run
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    try:  # bad input: one line saying what is wrong, before anything is created or overwritten
        prepared = prepare(cli_args)
    except ValueError as error:
        print(f"{os.path.basename(__file__)}: error: {error}", file=sys.stderr)
        sys.exit(2)
    main(cli_args, *prepared)
