"""Tests: run with `python -m pytest -q test_midas.py` (a few minutes on 2 CPU cores).
They make their own data in the official file formats and never need ../shared."""
import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

import data
import genotypes as G
import search
from model import (ArchConfig, NodeAttention, SearchCell, SearchNetwork, edge_weights, grid_size, mix_add, mix_node,
                   patch_tokens, pool_grid, twice_differentiable)

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--epochs', '1', '--batch-size', '8', '--init-channels', '4', '--layers', '3', '--cells', '1',
        '--subset', '32', '--epoch-decode-samples', '16', '--decode-samples', '16', '--report-freq', '1',
        '--device', 'cpu', '--no-download']


@pytest.fixture(scope='session')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar')
    data.write_cifar_like(str(root), 'cifar10', 200, 50)
    return str(root)


def run_script(*args, env=None, timeout=300):
    """Run a project script in a fresh interpreter, as a user would."""
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def kill_after_first_checkpoint(args, save):
    """Start `python ARGS --save SAVE` and SIGKILL it the moment SAVE/checkpoint.pt appears. -> that path."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE)
    proc = subprocess.Popen([sys.executable, *args, '--save', save], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = os.path.join(save, 'checkpoint.pt')
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert os.path.exists(ckpt), 'no checkpoint within 120 s'
    return ckpt


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one thread: on a shared, busy CPU, OpenMP's spin-waiting threads make every op
    several times slower (a tiny search: 25 s on two threads, 4 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cell, n, w, gamma, pi):
        self.calls.append((cell, n, w, gamma, pi))


# ---------------------------------------------------------------------------------------------
# Attention mathematics

def test_weights_sum_to_one_per_patch_and_gammas_to_two():
    torch.manual_seed(0)
    model = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig(patch=4)).eval()
    rec = Recorder()
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32), recorder=rec)
    assert len(rec.calls) == 3 * 4
    for cell, n, w, gamma, pi in rec.calls:
        for we in w:
            assert we.shape[0] == 3 and we.shape[1] == 8
            torch.testing.assert_close(we.sum(1), torch.ones_like(we[:, 0]))
        torch.testing.assert_close(gamma.sum(0), torch.full_like(gamma[0], 2.0))
        torch.testing.assert_close(pi.sum(0), torch.ones_like(pi[0]))
        assert pi.shape[0] == math.comb(n + 2, 2)
    # the first normal cell runs at 32x32 -> 8x8 patches; the reductions' nodes at 16x16 -> 4x4
    grids = [tuple(c[2][0].shape[-2:]) for c in rec.calls]
    assert grids[:4] == [(8, 8)] * 4 and grids[4:8] == [(4, 4)] * 4 and grids[8:] == [(2, 2)] * 4


def test_gamma_is_sum_of_pair_probabilities():
    torch.manual_seed(1)
    scores = torch.randn(4, 3, 2, 1, 1)  # 4 edges x 3 candidates x batch 2 x a 1 x 1 grid
    w, gamma, pi = edge_weights(scores, slice(1, 3), topology=True)  # candidate 0 plays 'none': not in the logit
    torch.testing.assert_close(w, scores.softmax(1))
    logits = [s[1:].logsumexp(0) for s in scores]
    pairs = list(itertools.combinations(range(4), 2))
    raw = torch.stack([logits[a] + logits[b] for a, b in pairs]).softmax(0)
    torch.testing.assert_close(pi, raw)
    for e in range(4):
        torch.testing.assert_close(gamma[e], sum(raw[p] for p, pair in enumerate(pairs) if e in pair))
    _, g2, p2 = edge_weights(scores[:2], slice(1, 3), topology=True)
    torch.testing.assert_close(g2, torch.ones_like(g2))  # two inputs: one pair, both edges kept
    with torch.autocast('cpu', dtype=torch.bfloat16):   # float32 scores stay float32 through the pair rule
        _, g3, _ = edge_weights(scores, slice(1, 3), topology=True)
    assert g3.dtype == torch.float32
    torch.testing.assert_close(g3, gamma)


def test_topology_cell_scales_each_edge_by_its_gamma():
    """§5: the node is sum_e gamma[e] m[e]. gamma that is computed but never multiplied in leaves a topology cell
    equal to a plain one. With every attention parameter 0 the scores are 0: every edge has the same logit, pi is
    uniform, so node 2 (two inputs, one pair) has gamma 1 and node 3 (three inputs, three pairs, each edge in two)
    gamma 2/3 on every edge: its output is 2/3 of the plain cell's, whose node 2 it shares."""
    from model import SearchCell
    C = 4
    cells = {}
    for topology in (True, False):
        cells[topology] = SearchCell('darts', G.get_space('darts')['normal'], C, C, C, False, False,
                                     ArchConfig(topology=topology, patch=4)).eval()
    with torch.no_grad():
        for p in cells[True].attention.parameters():
            p.zero_()
    cells[False].load_state_dict(cells[True].state_dict())
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, C, 8, 8, generator=g) for _ in range(2)]
    gammas = []
    with torch.no_grad():
        topo = cells[True](s, recorder=lambda c, n, w, gamma, pi: gammas.append(gamma))
        plain = cells[False](s)
    torch.testing.assert_close(gammas[1], torch.full_like(gammas[1], 2 / 3))   # the value the node must carry
    torch.testing.assert_close(topo[:, :C], plain[:, :C])                       # node 2: gamma 1
    torch.testing.assert_close(topo[:, C:2 * C], plain[:, C:2 * C] * (2 / 3))   # node 3: gamma 2/3
    assert plain[:, C:2 * C].abs().max() > 0.1


def test_patch_zero_is_global_pooling():
    x = torch.randn(2, 5, 8, 8)
    assert grid_size(8, 8, 0) == (1, 1)
    torch.testing.assert_close(pool_grid(x, 1, 1)[..., 0, 0], x.mean((2, 3)))
    torch.testing.assert_close(pool_grid(x, 2, 2), F.adaptive_avg_pool2d(x, 2))
    torch.testing.assert_close(pool_grid(torch.randn(1, 1, 7, 7), 3, 3).shape, torch.Size([1, 1, 3, 3]))
    model = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(patch=0)).eval()
    rec = Recorder()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), recorder=rec)
    assert all(w[0].shape[-2:] == (1, 1) for _, _, w, _, _ in rec.calls)


def test_mosaic_weights_differ_between_patches_and_inputs():
    torch.manual_seed(0)
    model = SearchNetwork('nb201', C=8, cells=1, cfg=ArchConfig(patch=4)).eval()
    rec = Recorder()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32), recorder=rec)
    w = rec.calls[0][2][0]                        # first node, its only edge: 2 x 5 x 8 x 8
    assert w.flatten(2).std(2).max() > 1e-3       # patches of one image disagree
    assert (w[0] - w[1]).abs().max() > 1e-3       # two images disagree
    static = SearchNetwork('nb201', C=8, cells=1, cfg=ArchConfig(method='darts')).eval()
    rec = Recorder()
    with torch.no_grad():
        static(torch.randn(2, 3, 32, 32), recorder=rec)
    assert rec.calls[0][2][0].shape == (1, 5, 1, 1)  # a static table: one weight per op


def test_mix_equals_explicit_upsampling():
    f, w = torch.randn(2, 3, 8, 8), torch.rand(2, 4, 4)
    up = F.interpolate(w.unsqueeze(1), size=(8, 8), mode='nearest')
    torch.testing.assert_close(mix_add(None, f, w), f * up)
    torch.testing.assert_close(mix_add(f, f, w), f + f * up)
    f7, w3 = torch.randn(1, 2, 7, 7), torch.rand(1, 3, 3)
    torch.testing.assert_close(mix_add(None, f7, w3), f7 * F.interpolate(w3.unsqueeze(1), size=(7, 7)))


@pytest.mark.parametrize('channels', [4, 32])   # below and above model._NARROW: both fast paths
@pytest.mark.parametrize('batch_weights', [3, 1])  # per input (MIDAS) and one static table (DARTS)
def test_channels_last_fast_paths_match_plain_autograd(channels, batch_weights):
    """patch_tokens and mix_node run hand-written kernels and backward passes on channels-last maps; their
    values and every gradient must equal plain pooling, upsampling and autograd on ordinary maps."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, channels, 8, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = torch.rand(batch_weights, 3, 2, 2, generator=g, dtype=torch.float64)

    def run(mode):
        fs = [(f.contiguous(memory_format=torch.channels_last) if mode == 'channels_last' else f.clone())
              .requires_grad_() for f in maps]
        w = weights.clone().requires_grad_()
        if mode != 'plain':
            tokens, mixed = patch_tokens(fs, 2, 2, 'meanstd'), mix_node(fs, w)
        else:  # the definitions, written out
            mean = torch.stack([pool_grid(f, 2, 2) for f in fs])
            std = (torch.stack([pool_grid(f * f, 2, 2) for f in fs]) - mean ** 2).clamp_min(1e-8).sqrt()
            tokens = torch.cat([mean, std], 2).permute(0, 1, 3, 4, 2)
            mixed = sum(f * F.interpolate(w[:, k:k + 1], size=(8, 8), mode='nearest') for k, f in enumerate(fs))
        loss = (tokens * torch.linspace(-1, 1, tokens.numel(), dtype=tokens.dtype).view(tokens.shape)).sum() \
            + (mixed * torch.linspace(-1, 1, mixed.numel(), dtype=mixed.dtype).view(mixed.shape)).sum()
        loss.backward()
        return tokens, mixed, [f.grad for f in fs], w.grad

    plain = run('plain')
    for mode in ('channels_last', 'contiguous'):
        fast = run(mode)
        torch.testing.assert_close(fast[0], plain[0])
        torch.testing.assert_close(fast[1], plain[1])
        for a, b in zip(fast[2], plain[2]):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(fast[3], plain[3])
    assert run('channels_last')[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('channels', [4, 32])   # both fast paths
def test_flat_patch_token_has_no_spread_gradient(channels):
    """A patch whose variance is below 1e-8 has its std clamped; plain autograd gives it no spread gradient. The
    hand-written backward must find such patches to the bit (std equal to the clamp, not only below it): else
    g_s / std * (f - m) leaks a gradient of ~1e-2 through the tiny noise of a nearly constant patch."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, channels, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    for f in maps:   # patch (0, 0) of the first image: constant plus noise of 1e-6, variance ~1e-12
        f[0, :, :4, :4] = 0.5 + 1e-6 * torch.randn(channels, 4, 4, generator=g, dtype=torch.float64)

    def grads(fast):
        fs = [(f.contiguous(memory_format=torch.channels_last) if fast else f.clone()).requires_grad_() for f in maps]
        if fast:
            tokens = patch_tokens(fs, 2, 2, 'meanstd')
        else:
            mean = torch.stack([pool_grid(f, 2, 2) for f in fs])
            std = (torch.stack([pool_grid(f * f, 2, 2) for f in fs]) - mean ** 2).clamp_min(1e-8).sqrt()
            tokens = torch.cat([mean, std], 2).permute(0, 1, 3, 4, 2)
        (tokens * torch.linspace(-1, 1, tokens.numel(), dtype=tokens.dtype).view(tokens.shape)).sum().backward()
        return [f.grad for f in fs]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('space', ['nb201', 's3'])   # s3: a DARTS-style cell with 'none'
def test_compiled_supernet_is_one_graph_and_matches_eager(space):
    """search.py --compile: torch.compile must see the whole supernet as one graph (fullgraph: a graph break would
    split it into pieces the compiler cannot fuse, recompiled node by node), and the plain-op paths it traces in place
    of the eager autograd Functions must give the eager values and gradients."""
    torch.manual_seed(0)
    net = SearchNetwork(space, 4, 10, 3, 1, ArchConfig()).to(memory_format=torch.channels_last)
    module, inputs = net, (torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last),)

    def run(forward):
        module.zero_grad(set_to_none=True)
        out = forward(*inputs)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        return out, [p.grad for p in module.parameters()]

    eager = run(module)
    compiled = run(torch.compile(module, backend='aot_eager', fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize('channels', [4, 32])
@pytest.mark.parametrize('grid', [2, 3])   # 3 does not divide 8: the plain path (torch.compile traces it too)
def test_tokens_of_bfloat16_maps_are_float32(channels, grid):
    """Under autocast the candidate maps are bf16; the token's std is E[f^2] - E[f]^2, which cancels, so the
    moments are taken in float32: the token equals that of the same maps upcast, and gradients stay bf16."""
    g = torch.Generator().manual_seed(0)
    maps = [(torch.randn(3, channels, 8, 8, generator=g) * 0.1 + 3.0).bfloat16()
            .contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(2)]
    tokens = patch_tokens(maps, grid, grid, 'meanstd')
    upcast = patch_tokens([f.detach().float() for f in maps], grid, grid, 'meanstd')
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, upcast)
    f = maps[0].detach()   # the same std with bf16 moments: off by far more than the spread itself (~0.1)
    std_bf16 = (pool_grid(f * f, grid, grid) - pool_grid(f, grid, grid) ** 2).clamp_min(1e-8).sqrt()
    assert (std_bf16.float().permute(0, 2, 3, 1) - upcast[0, ..., channels:]).abs().max() > 0.03
    # the gradient too is taken in float32 and rounded once: a + f b cancels here (mean 3, spread 0.1), and
    # a, b rounded to bf16 first left it 5-6 % off the exact gradient of these bf16 values
    weight = torch.randn(tokens.shape, generator=g)
    for layout in (torch.channels_last, torch.contiguous_format):   # every path of the backward
        ms = [f.detach().contiguous(memory_format=layout).requires_grad_() for f in maps]
        (patch_tokens(ms, grid, grid, 'meanstd') * weight).sum().backward()
        exact = [f.detach().double().requires_grad_() for f in ms]
        (patch_tokens(exact, grid, grid, 'meanstd') * weight.double()).sum().backward()
        for f, e in zip(ms, exact):
            assert f.grad.dtype == torch.bfloat16
            assert (f.grad.double() - e.grad).norm() < 0.01 * e.grad.norm()


@pytest.mark.parametrize('layout', [torch.channels_last, torch.contiguous_format])
def test_tokens_of_mixed_precision_maps(layout):
    """Under autocast a node mixes bf16 convolution maps with float32 identity and pool maps: each map gets its
    gradient in its own dtype, and a float32 map's at float32 precision, whatever the first map's dtype."""
    g = torch.Generator().manual_seed(0)
    conv, skip = (torch.randn(3, 16, 8, 8, generator=g).contiguous(memory_format=layout) for _ in range(2))
    weight = torch.randn(2, 3, 2, 2, 32, generator=g)
    maps = [conv.bfloat16().requires_grad_(), skip.clone().requires_grad_()]
    (patch_tokens(maps, 2, 2, 'meanstd') * weight).sum().backward()
    exact = skip.double().requires_grad_()
    (patch_tokens([conv.double(), exact], 2, 2, 'meanstd') * weight.double()).sum().backward()
    assert maps[0].grad.dtype == torch.bfloat16 and maps[1].grad.dtype == torch.float32
    torch.testing.assert_close(maps[1].grad.double(), exact.grad, rtol=1e-5, atol=1e-6)


def test_decode_ties_go_to_the_first_candidate():
    assert G._best_op(['sep_conv_3x3', 'skip_connect'], [0.5, 0.5])[0] == 'sep_conv_3x3'
    assert G._best_op(['skip_connect', 'sep_conv_3x3'], [0.5, 0.5])[0] == 'skip_connect'
    ops = G.SPACES['nb201']['normal']   # none, skip, conv 1x1, conv 3x3, avg-pool
    arch, _ = G.decode_nb201([[0.2] * 5] * 6, include_none=True)
    assert arch == G.nb201_str(['none'] * 6)
    arch, _ = G.decode_nb201([[0.2] * 5] * 6, include_none=False)
    assert arch == G.nb201_str([ops[0][1]] * 6)


@pytest.mark.parametrize('space,method', [('darts', 'midas'), ('darts', 'darts'), ('nb201', 'midas'),
                                          ('s3', 'midas')])
def test_parameter_free_candidates_computed_once_per_state_change_nothing(space, method):
    """A cell computes each pool / identity map, and its token, once per state for all the edges leaving it.
    Against every edge computing its own (op.pure all False): the same outputs, gradients and BN statistics
    in training, and the same outputs in eval mode afterwards (decoding reads the pools' running statistics)."""
    torch.manual_seed(0)
    shared = SearchNetwork(space, C=8, layers=3, cells=1, cfg=ArchConfig(method=method, patch=4))
    shared = shared.to(memory_format=torch.channels_last).double()
    each = SearchNetwork(space, C=8, layers=3, cells=1, cfg=ArchConfig(method=method, patch=4))
    each = each.to(memory_format=torch.channels_last).double()
    each.load_state_dict(shared.state_dict())
    for cell in each.search_cells():
        for op in cell._ops:
            op.pure = [False] * len(op.pure)
    assert any(any(op.pure) for cell in shared.search_cells() for op in cell._ops)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    for step in range(2):
        outputs = []
        for net in (shared, each):
            net.zero_grad()
            out = net(x + step)
            out.square().sum().backward()
            outputs.append((out, [p.grad for p in net.parameters()]))
        torch.testing.assert_close(outputs[0][0], outputs[1][0])
        for a, b in zip(outputs[0][1], outputs[1][1]):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(shared.eval()(x), each.eval()(x))


def test_darts_baseline_has_darts_nodes_and_inference_mode_leaves_the_supernet_trainable(monkeypatch):
    """ArchConfig(method='darts') is DARTS (§6: a node sums its edges), unless topology is asked for. A first forward
    under torch.inference_mode() (an evaluation in a user's own loop) made the cached pair tables inference
    tensors, and every training step after it failed: autograd cannot save them."""
    import model
    assert (ArchConfig(method='darts').topology, ArchConfig().topology) == (False, True)
    assert ArchConfig(method='darts', topology=True).topology
    monkeypatch.setattr(model, '_PAIR_TABLES', {})   # made afresh, under inference mode
    net = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig())
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        net(x)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.arch_parameters())


def test_architecture_parameters_are_separate():
    m = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig())
    arch, weights = m.arch_parameters(), m.weight_parameters()
    assert len(arch) == 3 * 4 * 2                 # (W_q, W_k) per node per cell
    assert {id(p) for p in arch}.isdisjoint(id(p) for p in weights)
    assert len(arch) + len(weights) == len(list(m.parameters()))
    d = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig(method='darts'))
    assert [tuple(p.shape) for p in d.arch_parameters()] == [(14, 8), (14, 8)]


def test_key_offset_starts_at_zero_and_separates_equal_tokens():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    plain = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False)).eval()
    torch.manual_seed(0)
    offset = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False, key_offset=True)).eval()
    keys = [p for n, p in offset.named_parameters() if n.endswith('key_offset')]
    d = ArchConfig().attn_dim
    assert len(keys) == 3 * 3 and {tuple(p.shape) for p in keys} == {(4, d), (8, d), (12, d)}  # E x 4 live ops
    assert set(map(id, keys)) <= set(map(id, offset.arch_parameters()))
    with torch.no_grad():
        assert torch.equal(plain(x), offset(x))   # zero offsets: the same scores, bit for bit
    # two candidates with the same token tie under W_k alone; their offsets tell them apart
    att = offset.search_cells()[0].attention[0]   # node 1: one input, four live candidates
    token = torch.randn(1, 2, 2, 2, 8).expand(4, 2, 2, 2, 8)
    z = torch.randn(2, 4, 2, 2)
    s = att(z, token)
    assert torch.allclose(s[1], s[3])
    with torch.no_grad():
        att.key_offset[3].normal_()
    s = att(z, token)
    assert torch.allclose(s[0], s[1]) and not torch.allclose(s[1], s[3], atol=1e-3)


def test_score_bias_starts_at_zero_and_shifts_scores_alike_for_every_input():
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    plain = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False, tau=0.5)).eval()
    torch.manual_seed(0)
    biased = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False, score_bias=True, tau=0.5)).eval()
    bias = [p for n, p in biased.named_parameters() if n.endswith('score_bias')]
    assert [p.numel() for p in bias] == [4, 8, 12] * 3 and set(map(id, bias)) <= set(map(id, biased.arch_parameters()))
    with torch.no_grad():
        assert torch.equal(plain(x), biased(x))   # zero biases: the same scores, bit for bit
    att = biased.search_cells()[0].attention[0]
    token = torch.randn(1, 2, 2, 2, 8).expand(4, 2, 2, 2, 8)   # four candidates with one token
    z = torch.randn(2, 4, 2, 2)
    with torch.no_grad():
        att.score_bias[3] = 0.7
    s = att(z, token)
    assert torch.allclose(s[1], s[2])
    # in logit units over tau, whatever the input and patch: a static alpha
    assert torch.allclose(s[3] - s[1], torch.full_like(s[1], 0.7 / 0.5), atol=1e-5)


@pytest.mark.parametrize('space, kw, groups', [('nb201', dict(cells=3), 3), ('darts', dict(layers=8), 5)])
def test_shared_attention_is_one_per_stage_and_cell_type(space, kw, groups):
    """--share-attention: the cells of a stage (and type) use one attention, whose gradient sums theirs; the
    architecture parameters are each listed once (Adam refuses a parameter listed twice)."""
    torch.manual_seed(0)
    net = SearchNetwork(space, C=4, cfg=ArchConfig(share_attention=True, topology=space == 'darts'), **kw)
    attentions = [cell.attention for cell in net.search_cells()]
    assert len({id(a) for a in attentions}) == groups and len(attentions) > groups
    arch = net.arch_parameters()
    assert len(arch) == len({id(p) for p in arch}) == groups * len(list(attentions[0].parameters()))
    assert {id(p) for p in arch}.isdisjoint(id(p) for p in net.weight_parameters())
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch)
    torch.optim.Adam(arch, 3e-4).step()
    own = SearchNetwork(space, C=4, cfg=ArchConfig(topology=space == 'darts'), **kw)
    assert len(own.arch_parameters()) == len(attentions) * len(list(attentions[0].parameters()))


def test_edge_norm_keeps_the_scale_that_tells_skip_from_avg_pool():
    torch.manual_seed(0)
    edge = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False)).search_cells()[0].attention[1]
    alone = NodeAttention(2, 4, ArchConfig(edge_norm=False), 8)
    alone.load_state_dict(edge.state_dict())
    z = torch.randn(3, 8, 2, 2)
    t = torch.randn(8, 3, 2, 2, 8)   # node 2: two edges of four live candidates, edge-major
    t[3] = 0.6 * t[0]                # avg-pool: the skip's token, every value shrunk alike (§12)
    t[6] = 5.0 * t[5] + 1.0          # on the other edge, a token of another scale and offset
    s_edge, s_alone = edge(z, t), alone(z, t)
    # normalised alone, a token's scale and offset are lost: the pairs tie
    assert torch.allclose(s_alone[0], s_alone[3], atol=1e-5) and torch.allclose(s_alone[5], s_alone[6], atol=1e-5)
    assert not torch.allclose(s_edge[0], s_edge[3], atol=1e-3) and not torch.allclose(s_edge[5], s_edge[6], atol=1e-3)
    # the definition: one mean and variance per edge, sample and patch, over its 4 candidates and 8 channels
    e = t.view(2, 4, 3, 2, 2, 8)
    var, mean = torch.var_mean(e, (1, 5), correction=0, keepdim=True)
    keys = ((e - mean) / (var + 1e-5).sqrt()).view(8, 3, 2, 2, 8)
    q = edge.w_q(F.layer_norm(z.permute(0, 2, 3, 1), (8,)))
    d = ArchConfig().attn_dim
    torch.testing.assert_close(s_edge, (keys * (q @ edge.w_k.weight)).sum(-1) / math.sqrt(d))
    # every candidate of an edge scaled alike (a state of another scale) changes nothing
    t2 = t.clone()
    t2[4:] *= 3.0
    torch.testing.assert_close(edge(z, t2)[4:], s_edge[4:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('edge_norm', [True, False])
def test_decorrelate_scores_a_candidate_by_the_mean_query_against_its_mean_key(edge_norm):
    """--decorrelate: per candidate, the scores' mean over the batch and the patches is <mean query, mean key>, and
    each image's and patch's deviation from that mean is the plain scores' deviation. The identity's token, made of
    the query's own input, takes the query-key covariance with it; one image on a 1 x 1 grid has none to remove."""
    torch.manual_seed(0)
    plain = NodeAttention(2, 4, ArchConfig(edge_norm=edge_norm), 8)
    dec = NodeAttention(2, 4, ArchConfig(edge_norm=edge_norm, decorrelate=True), 8)
    dec.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 8, 2, 2, generator=g)
    t = torch.randn(8, 6, 2, 2, 8, generator=g)              # two edges of four live candidates, edge-major
    t[0] = z[:, :4].permute(0, 2, 3, 1).repeat(1, 1, 1, 2)   # a skip: its token is the query's first input
    s, d = plain(z, t), dec(z, t)
    torch.testing.assert_close(d - d.mean((1, 2, 3), keepdim=True), s - s.mean((1, 2, 3), keepdim=True))
    if edge_norm:   # the keys as the scores read them: each edge's candidates normalised together
        keys = F.layer_norm(t.view(2, 4, 6, 2, 2, 8).permute(0, 2, 3, 4, 1, 5).reshape(2, 6, 2, 2, 32), (32,))
        keys = keys.view(2, 6, 2, 2, 4, 8).permute(0, 4, 1, 2, 3, 5).reshape(8, 6, 2, 2, 8)
    else:
        keys = F.layer_norm(t, (8,))
    qk = plain.w_q(F.layer_norm(z.permute(0, 2, 3, 1), (8,))) @ plain.w_k.weight
    matched = (keys.mean((1, 2, 3)) * qk.mean((0, 1, 2))).sum(-1) / math.sqrt(ArchConfig().attn_dim)
    torch.testing.assert_close(d.mean((1, 2, 3)), matched)
    assert not torch.allclose(s.mean((1, 2, 3)), matched, atol=1e-3)   # the plain means hold the covariance too
    torch.testing.assert_close(dec(z[:1, :, :1, :1], t[:, :1, :1, :1]), plain(z[:1, :, :1, :1], t[:, :1, :1, :1]))
    free = [True, False, False, True] * 2   # --decorrelate-free: the parameter-free keys decorrelated, the rest plain
    part = NodeAttention(2, 4, ArchConfig(edge_norm=edge_norm, decorrelate_free=True), 8, free)
    part.load_state_dict(plain.state_dict())
    mask = torch.tensor(free)
    torch.testing.assert_close(part(z, t)[mask], d[mask])
    torch.testing.assert_close(part(z, t)[~mask], s[~mask])


def test_decorrelate_free_marks_the_parameter_free_candidates_of_each_edge():
    """S1's edges have different candidates: each node's mask follows its own edges' (identity and pools, not
    convolutions); the DARTS space's keys are the same on every edge."""
    ops = G.get_space('s1')['normal']
    cell = SearchCell('darts', ops, 8, 8, 8, False, False, ArchConfig(decorrelate_free=True))
    for (_, inputs), attn, e0 in zip(cell.nodes, cell.attention, (0, 2, 5, 9)):
        want = [op in ('skip_connect', 'max_pool_3x3', 'avg_pool_3x3') for e in range(e0, e0 + len(inputs))
                for op in ops[e] if op != 'none']
        assert attn.free_mask.tolist() == want and any(want) and not all(want)
    assert 'free_mask' not in cell.state_dict()   # checkpoints stay as before
    cell.to('meta')   # as .to('cuda'): the mask the scores use moves with the module (the buffer is replaced)
    assert all(attn.decorrelated_keys.device.type == 'meta' for attn in cell.attention)


def test_token_bn_makes_the_scores_blind_to_the_scale_of_a_cells_input():
    """--token-bn: the identity's and avg-pool's tokens standardised by their state's batch statistics, as a BN
    standardises every conv's map. A cell's input scaled by 40 (what depth does to NB201's states) then leaves
    the first node's mixing weights as they were (the later nodes mix maps of both scales, so their inputs do
    change); without it, skip and avg-pool take scores that grow with the input. Avg-pool keeps the smaller
    spread that tells it from skip."""
    from model import SearchCell, standardised_tokens
    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = {}
    for token_bn in (False, True):
        torch.manual_seed(0)
        cell = SearchCell('nb201', G.get_space('nb201')['normal'], None, 8, 8, False, False,
                          ArchConfig(token_bn=token_bn)).train()
        for scale in (1.0, 40.0):
            seen = []
            with torch.no_grad():
                cell([scale * x], recorder=lambda c, n, w, gamma, pi: seen.append(torch.stack(w)))
            weights[token_bn, scale] = seen[0]   # node 1: its one edge, from the cell's input
    assert torch.allclose(weights[True, 1.0], weights[True, 40.0], atol=1e-4)
    assert not torch.allclose(weights[False, 1.0], weights[False, 40.0], atol=1e-2)
    skip, pool = x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    t = standardised_tokens(patch_tokens([skip, pool], 4, 4, 'meanstd'), [x, x], 'meanstd')
    assert t[0, ..., 8:].mean() > 1.2 * t[1, ..., 8:].mean()   # pooling smooths: a smaller spread per patch
    assert abs(t[0, ..., :8].mean()) < 0.1 and abs(t[0, ..., 8:].pow(2).mean() + t[0, ..., :8].pow(2).mean() - 1) < 0.05
    assert torch.equal(standardised_tokens(t, [None, None], 'meanstd'), t)   # only where a state is given


def test_token_before_bn_reads_the_input_of_each_candidates_final_bn():
    from model import forward_before_bn
    from ops import OPS
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for name in OPS:
        for stride in (1, 2):
            op = OPS[name](4, stride, False).train()
            bns = [m for m in op.modules() if isinstance(m, torch.nn.BatchNorm2d)]
            seen = []
            if bns:
                bns[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
            torch.manual_seed(1)
            y, before = forward_before_bn(op, x)
            torch.manual_seed(1)   # 'noise' draws again
            assert torch.equal(y, op(x)), name
            assert before is (seen[0] if bns else y), name
    # in a supernet: only the scores move (no parameter added, the same checkpoint layout); skip and
    # avg-pool, which end in no BN, keep their tokens, the convs do not
    # (training mode: BN by batch statistics; fresh running ones, in eval mode, are nearly the identity; tokens
    # normalised one by one, so that a score moves only with its own token)
    torch.manual_seed(0)
    after = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False, edge_norm=False))
    torch.manual_seed(0)
    before = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False, edge_norm=False, token_before_bn=True))
    assert after.state_dict().keys() == before.state_dict().keys()
    weights = {}
    for net in (after, before):
        seen = []
        with torch.no_grad():
            net(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)),
                recorder=lambda cell, n, w, gamma, pi: seen.append(torch.stack(w)))
        weights[net is before] = seen[0]   # node 1 of the first cell: E x B x J x gh x gw
    ops = G.SPACES['nb201']['normal'][0]
    convs = [ops.index('nor_conv_1x1'), ops.index('nor_conv_3x3')]
    others = [ops.index('skip_connect'), ops.index('avg_pool_3x3')]
    # softmax weights shift everywhere when some scores change; their ratios do not where the scores are equal
    ratio = {k: w[:, :, others[0]] / w[:, :, others[1]] for k, w in weights.items()}
    assert torch.allclose(ratio[False], ratio[True], atol=1e-5)
    conv_ratio = {k: w[:, :, convs[0]] / w[:, :, convs[1]] for k, w in weights.items()}
    assert not torch.allclose(conv_ratio[False], conv_ratio[True], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Decoding rules on hand-made tables

def _table(space, fill, picks):
    ops = G.SPACES[space]['normal']
    w = [[fill] * len(ops[e]) for e in range(len(ops))]
    for e, op, value in picks:
        w[e][ops[e].index(op)] = value
    return w


def test_darts_rule_keeps_two_strongest_edges_and_ignores_none():
    # node 2: edges 0, 1; node 3: edges 2, 3, 4 (inputs 0, 1, 2)
    w = _table('darts', 0.1, [(0, 'sep_conv_3x3', 0.5), (1, 'skip_connect', 0.3), (2, 'none', 0.9),
                              (3, 'max_pool_3x3', 0.4), (4, 'dil_conv_5x5', 0.35)])
    cell, _ = G.decode_darts_cell(G.SPACES['darts']['normal'], w)
    assert cell[:2] == [('sep_conv_3x3', 0), ('skip_connect', 1)]
    assert cell[2:4] == [('max_pool_3x3', 1), ('dil_conv_5x5', 2)]  # edge 0->3 lost: only 'none' is strong


def test_darts_rule_ranks_edges_by_their_best_weight_not_its_margin():
    """DARTS keeps the two edges whose best non-'none' op is strongest; how clearly that op beats its runner-up
    (the margin, which the decode also reports) must not rank the edges."""
    # node 3: edge 2 (input 0) best 0.45 by 0.01; edge 3 (input 1) 0.30 by 0.25; edge 4 (input 2) 0.20 by 0.19
    w = _table('darts', 0.01, [(2, 'sep_conv_3x3', 0.45), (2, 'sep_conv_5x5', 0.44), (3, 'skip_connect', 0.30),
                               (3, 'max_pool_3x3', 0.05), (4, 'dil_conv_3x3', 0.20)])
    cell, margins = G.decode_darts_cell(G.SPACES['darts']['normal'], w)
    assert cell[2:4] == [('sep_conv_3x3', 0), ('skip_connect', 1)]
    assert margins[2]['op_margin'] == pytest.approx(0.01) and margins[2]['edge_margin'] == pytest.approx(0.10)


def test_pair_rule_keeps_most_probable_pair():
    w = _table('darts', 0.1, [(2, 'sep_conv_3x3', 0.9), (3, 'sep_conv_5x5', 0.8), (4, 'avg_pool_3x3', 0.2)])
    pairs = [[1.0], [0.1, 0.7, 0.2], [1 / 6] * 6, [0.1] * 9 + [0.1]]
    pairs[2][5] = 0.5  # node 4: pair (2, 3)
    pairs[3][0] = 0.2  # node 5: pair (0, 1)
    cell, margins = G.decode_darts_cell(G.SPACES['darts']['normal'], w, pairs)
    assert [i for _, i in cell] == [0, 1, 0, 2, 2, 3, 0, 1]
    assert cell[3] == ('avg_pool_3x3', 2)     # the pair rule wins over the stronger op on edge 1->3
    assert margins[2]['edge_margin'] == pytest.approx(0.5)


def test_nb201_argmax_includes_none():
    w = [[0.3, 0.2, 0.2, 0.2, 0.1]] + [[0.1, 0.1, 0.1, 0.6, 0.1]] * 4 + [[0.1, 0.5, 0.1, 0.2, 0.1]]
    arch, margins = G.decode_nb201(w)
    assert arch == '|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|skip_connect~2|'
    assert margins[0]['op_margin'] == pytest.approx(0.1)
    arch, _ = G.decode_nb201(w, include_none=False)  # search.py's default, --decode-none exclude
    assert arch == '|skip_connect~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|skip_connect~2|'
    # skip, 1x1 and 3x3 tie on edge 0 at 0.2: the first of them, as argmax


def test_redecode_rewrites_the_genotype_from_saved_weights(cifar, tmp_path):
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 'nb201', '--decode-none', 'include', *TINY])
    with open(os.path.join(save, 'weights.json')) as f:
        record = json.load(f)
    w = record['weights']['normal']['weights']
    w[0] = [0.4, 0.3, 0.1, 0.1, 0.1]   # 'none' leads edge 0: the two rules must part there
    with open(os.path.join(save, 'weights.json'), 'w') as f:
        json.dump(record, f)
    archs = []
    for rule in ('exclude', 'include'):
        archs.append(search.main(['--redecode', save, '--decode-none', rule]))
        assert archs[-1] == G.decode_nb201(w, include_none=rule == 'include')[0]
        with open(os.path.join(save, 'genotype.json')) as f:
            assert json.load(f)['arch'] == archs[-1]
    assert archs[0].startswith('|skip_connect~0|+') and archs[1].startswith('|none~0|+')
    _one_line_error(run_script('search.py', '--redecode', save, '--select', 'perturb'),
                    f'--resume {save} --select perturb')
    _one_line_error(run_script('search.py', '--redecode', save, '--resume', save), 'exclude each other')
    # it writes into RUN with RUN's settings: a --save or a search flag would go unheeded
    _one_line_error(run_script('search.py', '--redecode', save, '--save', str(tmp_path / 'elsewhere'), '--epochs',
                               '9'), 'leave out --save, --epochs')
    # a finished run whose checkpoint is gone is not searched again over its record
    os.remove(os.path.join(save, 'checkpoint.pt'))
    _one_line_error(run_script('search.py', '--resume', save), 'its checkpoint was lost')
    bad = tmp_path / 'bad'   # a hand-edited args.json: one line, not a TypeError or KeyError
    bad.mkdir()
    shutil.copy(os.path.join(save, 'weights.json'), bad / 'weights.json')
    with open(os.path.join(save, 'args.json')) as f:
        started = json.load(f)
    for text in ('[1, 2]', json.dumps({k: v for k, v in started.items() if k != 'dataset'})):
        (bad / 'args.json').write_text(text)
        _one_line_error(run_script('search.py', '--redecode', str(bad)), 'cannot re-decode', 'not those of one')
    # weights of another space (four candidates an edge) are refused, not zipped into a cell of the first four
    (bad / 'args.json').write_text(json.dumps(started))
    record = json.loads((bad / 'weights.json').read_text())
    record['weights']['normal']['weights'] = [edge[:4] for edge in w]
    (bad / 'weights.json').write_text(json.dumps(record))
    _one_line_error(run_script('search.py', '--redecode', str(bad)), 'cannot re-decode', 'do not fit a space')
    assert not (bad / 'genotype.json').exists()


@pytest.mark.parametrize('space', ['darts', 's1', 's2', 's3', 's4'])
def test_decoded_genotypes_respect_per_edge_lists(space):
    torch.manual_seed(0)
    sp = G.SPACES[space]
    for trial in range(5):
        weights = {t: torch.rand(14, len(sp[t][0])).tolist() for t in ('normal', 'reduce')}
        pairs = {t: [torch.rand(math.comb(k + 2, 2)).tolist() for k in range(4)] for t in ('normal', 'reduce')}
        for p in (None, pairs):
            g, _ = G.decode_darts(space, weights, p)
            G.validate_genotype(g, space)
            for cell in (g.normal, g.reduce):
                inputs = [i for _, i in cell]
                assert all(inputs[2 * k] != inputs[2 * k + 1] for k in range(4))
                assert all(op != 'none' for op, _ in cell)


def test_validate_rejects_ops_outside_the_space():
    with pytest.raises(ValueError, match='not a candidate'):
        G.validate_genotype(G.DARTS_V2, 's2')
    G.validate_genotype(G.DARTS_V2, 'darts')
    bad = G.DARTS_V2._replace(normal=[('conv_9x9', 0)] + G.DARTS_V2.normal[1:])
    with pytest.raises(ValueError, match='unknown op'):
        G.validate_genotype(bad)


def test_genotypes_round_trip():
    for name, g in G.PUBLISHED.items():
        obj = json.loads(json.dumps(G.genotype_to_json(g, None)))
        assert G.genotype_from_json(obj)[0] == g, name
        assert G.parse_genotype_literal(repr(g)) == g
    text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
            "normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
            "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
            "('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    assert G.parse_genotype_literal(text) == G.DARTS_V2
    with pytest.raises(ValueError):
        G.parse_genotype_literal("Genotype(normal=__import__('os').system('true'))")
    n, r = repr(G.DARTS_V2.normal), repr(G.DARTS_V2.reduce)
    for bad in (f"Genotype({n}, range(2, 6), {r}, range(2, 6), 'extra')",      # what Genotype() itself refuses
                f"Genotype({n}, range(2, 6), {r}, range(2, 6), normal_cnocat=[5])",   # is not dropped silently
                f"Genotype({n}, range(2, 6), {r}, range(2, 6), normal={n})",
                f"Genotype({n}, range(2, 6), {r}, {{2: 0, 3: 0, 4: 0, 5: 0}})",
                f"Genotype({[('sep_conv_3x3', 0, 1)] + list(G.DARTS_V2.normal[1:])!r}, range(2, 6), {r}, range(2, 6))",
                f"Genotype({['sep_conv_3x3'] * 8!r}, range(2, 6), {r}, range(2, 6))"):
        with pytest.raises(ValueError, match='malformed genotype literal'):
            G.load_genotype(bad)
    assert G.nb201_str(G.nb201_parse(G.NB201_BEST)) == G.NB201_BEST
    for bad in ['|nor_conv_3x3~0|+|none~0|', '|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|',
                '|none~1|+|none~0|none~1|+|none~0|none~1|none~2|']:
        with pytest.raises(ValueError):
            G.nb201_parse(bad)
    assert len(set(map(G.nb201_str, itertools.product(G.NB201_PRIMITIVES, repeat=6)))) == 15625


def test_every_op_name_is_buildable():
    from ops import OPS
    assert set(G.ALL_OPS) == set(OPS)
    x = torch.randn(2, 4, 8, 8)
    for name, build in OPS.items():
        for stride in (1, 2):
            assert build(4, stride, True)(x).shape == (2, 4, 8 // stride, 8 // stride), (name, stride)


def test_a_space_and_ops_of_ones_own_are_data(cifar, monkeypatch, tmp_path, capsys):
    """What a researcher edits first: an op added to ops.OPS and genotypes.ALL_OPS, a space added to SPACES. An
    NB201-kind space decodes by its own lists (it took the benchmark's names before: every edge mislabelled), a
    random op is found by what it holds (a renamed Noise was computed once per state), a malformed space is one line
    (was an IndexError or AssertionError traceback), and the token before BN is read in a Conv-BN-ReLU too."""
    import ops
    from model import MixedOp, forward_before_bn
    reordered = ['none', 'avg_pool_3x3', 'nor_conv_3x3', 'nor_conv_1x1', 'skip_connect']
    monkeypatch.setitem(G.SPACES, 'nb201r', dict(kind='nb201', normal=[list(reordered) for _ in range(6)]))
    weights = [[0.1, 0.5, 0.2, 0.1, 0.1], [0.1, 0.1, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.5, 0.2]] * 2
    arch, _ = search.decode_weights({'normal': {'weights': weights}},
                                    argparse.Namespace(space='nb201r', decode_none='exclude'))
    assert G.nb201_parse(arch) == ['avg_pool_3x3', 'nor_conv_3x3', 'nor_conv_1x1'] * 2
    G.validate_genotype(arch, 'nb201r')
    with pytest.raises(ValueError, match="op 'nor_conv_3x3' is not a candidate of edge 0 of space 's'"):
        monkeypatch.setitem(G.SPACES, 's', dict(kind='nb201', normal=[['skip_connect', 'nor_conv_1x1']] * 6))
        G.validate_genotype(G.NB201_BEST, 's')
    # a parameter-free op that draws random numbers, under a name of its own: drawn on every edge, not shared
    monkeypatch.setitem(ops.OPS, 'noise2', ops.OPS['noise'])
    assert MixedOp(4, 1, ['noise2', 'skip_connect', 'max_pool_3x3'], True).pure == [False, True, True]
    monkeypatch.setattr(G, 'ALL_OPS', [*G.ALL_OPS, 'noise2'])   # and --select perturb shares no removals over ranks
    monkeypatch.setitem(G.SPACES, 'n', dict(kind='nb201', normal=[['noise2', 'skip_connect']] * 6))
    assert not search.shares_removals(SearchNetwork('n', C=4, cells=1, cfg=ArchConfig(patch=0)), 2)
    assert search.shares_removals(SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(patch=0)), 2)
    # a malformed space: one line, before anything is built
    for edges, words in (([['skip_connect', 'sep_conv_3x3']] * 9, 'needs 14 candidate lists'),
                         ([['skip_connect', 'sep_conv3x3']] * 14, "names op 'sep_conv3x3'"),
                         ([['skip_connect', 'sep_conv_3x3']] * 13 + [['sep_conv_3x3']], 'the same number')):
        monkeypatch.setitem(G.SPACES, 'mine', dict(kind='darts', normal=edges, reduce=edges))
        r = _cli(search.main, capsys, '--data', cifar, '--space', 'mine', '--save', str(tmp_path / 'r'), *TINY)
        _one_line_error(r, "search space 'mine'", words)
        assert not os.path.exists(tmp_path / 'r')
    # --token-before-bn: the input of the BN wherever it sits, the op's output unchanged
    torch.manual_seed(0)
    op = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    x = torch.randn(2, 4, 8, 8)
    y, before = forward_before_bn(op, x)
    assert torch.equal(y, op(x)) and torch.equal(before, op[0](x))
    import analyze   # a mosaic draws an op of one's own in a colour of its own (all were black)
    assert analyze.op_colour('sep_conv_3x3') == analyze.OP_COLOURS['sep_conv_3x3']
    mine = analyze.op_colour('conv_1x1_nobn')
    assert mine == analyze.op_colour('conv_1x1_nobn') != (0, 0, 0) and mine not in analyze.OP_COLOURS.values()


def test_factorized_reduce_reads_both_pixel_grids():
    """FactorizedReduce (the stride-2 skip and a reduction cell's s0 preprocessing) halves H and W with two
    stride-2 1x1 convolutions, one on the even pixels and one on the grid offset by one pixel in both directions:
    together they see every other pixel of both parities, where one grid alone would drop three quarters."""
    from ops import FactorizedReduce
    torch.manual_seed(0)
    fr = FactorizedReduce(3, 4)
    values = torch.rand(2, 3, 8, 8) + 0.1   # positive: the leading ReLU keeps them
    for parity, conv in ((0, fr.conv_1), (1, fr.conv_2)):
        x = torch.zeros_like(values)
        x[:, :, parity::2, parity::2] = values[:, :, parity::2, parity::2]
        out = fr.reduce(x)
        mine, other = (out[:, :2], out[:, 2:]) if parity == 0 else (out[:, 2:], out[:, :2])
        torch.testing.assert_close(mine, F.conv2d(x[:, :, parity::2, parity::2], conv.weight))
        assert torch.equal(other, torch.zeros_like(other))


def test_factorized_reduce_backward_leaves_the_heap_intact_on_narrow_channels_last_maps():
    """oneDNN's weight gradient of a stride-2 1x1 convolution writes past its buffer on channels-last CPU maps of
    few channels (torch 2.13: 8 x 8 x 64 x 64 segfaults under glibc's MALLOC_CHECK_=3); FactorizedReduce, on every
    reduction of a search and a retraining at small --init-channels, must not call it."""
    code = ('import torch; from ops import FactorizedReduce; torch.manual_seed(0)\n'
            'for c, size in ((8, 64), (4, 32), (4, 56)):\n'
            '    fr = FactorizedReduce(c, c).to(memory_format=torch.channels_last)\n'
            '    for _ in range(5):\n'
            '        x = torch.randn(8, c, size, size).contiguous(memory_format=torch.channels_last)\n'
            '        fr(x).sum().backward()\n')
    env = {**os.environ, 'MALLOC_CHECK_': '3', 'OMP_NUM_THREADS': '1'}
    done = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]


# ---------------------------------------------------------------------------------------------
# End to end: tiny searches on generated CIFAR-format files

@pytest.mark.parametrize('space', ['darts', 's1', 's2', 's3', 's4', 'nb201'])
@pytest.mark.parametrize('method', ['midas', 'darts'])
def test_tiny_search_writes_a_valid_genotype(cifar, tmp_path, space, method):
    save = str(tmp_path / 'run')
    torch.manual_seed(0)
    search.main(['--data', cifar, '--save', save, '--space', space, '--method', method, *TINY])
    with open(os.path.join(save, 'genotype.json')) as f:
        g, sp = G.genotype_from_json(json.load(f))
    assert sp == space
    G.validate_genotype(g, space)
    if space == 'nb201':
        assert isinstance(g, str) and G.nb201_str(G.nb201_parse(g)) == g
    else:
        for cell in (g.normal, g.reduce):
            assert all(cell[2 * k][1] != cell[2 * k + 1][1] for k in range(4))
    for name in ('log.txt', 'args.json', 'history.json', 'weights.json', 'checkpoint.pt'):
        assert os.path.isfile(os.path.join(save, name)), name
    for name in ('genotype.json', 'args.json', 'history.json', 'weights.json'):   # strict JSON: no Infinity, NaN
        with open(os.path.join(save, name)) as f:
            json.load(f, parse_constant=lambda token: pytest.fail(f'{name} holds {token}'))
    with open(os.path.join(save, 'weights.json')) as f:
        record = json.load(f)
    assert set(record['weights']) == ({'normal'} if space == 'nb201' else {'normal', 'reduce'})
    assert torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)['epoch'] == 1
    with open(os.path.join(save, 'history.json')) as f:   # the epoch's decode read the final one's 16 images
        (epoch,) = json.load(f)
    assert epoch['epoch'] == 1   # the same images, and S4's 'noise' the same fixed draw
    assert G.genotype_from_json(epoch['genotype']) == (g, sp)


def test_nb201_table_scores_the_decoded_cell(cifar, tmp_path, capsys):
    """The cell is scored on the dataset it was searched on, and, as NAS-Bench-201's protocol reports it, on the
    table's other datasets too: in the log, in genotype.json, and in analyze.py's table (from genotype.json, or
    from the table for a run older than these scores)."""
    import analyze
    table = tmp_path / 'nb201.csv'
    rows = ['index,arch,c10_valid,c10_test,c100_valid,c100_test,in16_valid,in16_test']
    for k, ops in enumerate(itertools.product(G.NB201_PRIMITIVES, repeat=6)):
        rows.append(f'{k},{G.nb201_str(ops)},{k % 97 / 1.0},{k % 89 / 1.0},{k % 83},{k % 79},{k % 73},{k % 71}')
    table.write_text('\n'.join(rows) + '\n')
    save = str(tmp_path / 'run')
    arch = search.main(['--data', cifar, '--save', save, '--space', 'nb201', '--nb201-table', os.path.relpath(table),
                        *TINY])
    with open(os.path.join(save, 'args.json')) as f:   # typed relative, kept absolute: found from any folder later
        started = json.load(f)
    assert (started['nb201_table'], started['data']) == (str(table), os.path.abspath(cifar))
    k = [G.nb201_str(ops) for ops in itertools.product(G.NB201_PRIMITIVES, repeat=6)].index(arch)
    out = capsys.readouterr().out
    others = (f'(the same cell on cifar100: valid {k % 83:.2f} test {k % 79:.2f}; imagenet16-120: valid '
              f'{k % 73:.2f} test {k % 71:.2f})')
    assert f'valid {k % 97:.2f} test {k % 89:.2f} {others}' in out
    with open(os.path.join(save, 'genotype.json')) as f:
        result = json.load(f)
    assert result['nb201'] == {'valid': k % 97, 'test': k % 89}
    assert result['nb201_datasets'] == {'cifar10': result['nb201'], 'cifar100': {'valid': k % 83, 'test': k % 79},
                                        'imagenet16-120': {'valid': k % 73, 'test': k % 71}}
    row = f'| {k % 97:.2f} | {k % 89:.2f} | {k % 83:.2f} | {k % 79:.2f} | {k % 73:.2f} | {k % 71:.2f} |'
    text = analyze.nb201_results([save])
    assert '| CIFAR-100 valid | CIFAR-100 test | ImageNet16-120 valid | ImageNet16-120 test |' in text and row in text
    del result['nb201_datasets']   # a run older than these scores: '–' without the table, the scores with it
    with open(os.path.join(save, 'genotype.json'), 'w') as f:
        json.dump(result, f)
    assert 'CIFAR-100' not in analyze.nb201_results([save])
    assert row in analyze.nb201_results([save], str(table))
    other = tmp_path / 'other.csv'   # another table: every column of the row from it, none left from genotype.json
    other.write_text('\n'.join([rows[0]] + [','.join(r.split(',')[:2] + ['1.5'] * 6) for r in rows[1:]]) + '\n')
    assert '| 1.50 | 1.50 | 1.50 | 1.50 | 1.50 | 1.50 |' in analyze.nb201_results([save], str(other))
    other.write_text('\n'.join(r for r in rows if f',{arch},' not in r) + '\n')
    with pytest.raises(analyze.RunError, match='has no cifar10 score'):
        analyze.nb201_results([save], str(other))
    assert "scores 15,624 of NAS-Bench-201's 15,625 cells" in capsys.readouterr().err
    assert search.main(['--redecode', save, '--nb201-table', str(table)]) == arch   # re-decoded: scored again
    out, err = capsys.readouterr()
    assert others in out and 'warning' not in err   # the whole table: no word of missing cells
    for name in ('args.json', 'checkpoint.pt'):   # older code took --topology in NB201, and ignored it: such a
        path = os.path.join(save, name)          # run still resumes (a fresh one is refused the flag)
        if name == 'args.json':
            started = json.loads(open(path).read())
            open(path, 'w').write(json.dumps({**started, 'topology': True}))
        else:
            state = torch.load(path, weights_only=False)
            state['config']['topology'] = True
            torch.save(state, path)
    assert search.main(['--resume', save]) == arch
    capsys.readouterr()
    moved = tmp_path / 'moved.csv'   # the run's own table gone (another machine): a resume goes on, unscored
    table.rename(moved)
    assert search.main(['--redecode', save]) == arch
    assert 'is not there: the cell goes unscored' in capsys.readouterr().out
    assert search.main(['--resume', save]) == arch
    assert "the run's table, is not there" in capsys.readouterr().out
    with pytest.raises(train.RunError, match='cannot read --nb201-table'):   # a path typed now must be there
        search.main(['--resume', save, '--nb201-table', str(table)])
    with open(os.path.join(save, 'genotype.json')) as f:
        assert 'nb201' not in json.load(f)
    search.main(['--resume', save, '--nb201-table', str(moved)])
    with open(os.path.join(save, 'genotype.json')) as f:
        assert json.load(f)['nb201'] == {'valid': k % 97, 'test': k % 89}


def test_nb201_table_reads_the_datasets_own_columns(tmp_path, capsys):
    """NAS-Bench-201 holds valid and test accuracies per dataset (c10_, c100_, in16_ columns): a cell found on
    CIFAR-100 must be scored by the CIFAR-100 columns, and a table without them refused, not scored by CIFAR-10's.
    A table short of the 15,625 cells (a truncated copy) is said to be on stderr."""
    table = tmp_path / 'nb201.csv'
    table.write_text('index,arch,c10_valid,c10_test,c100_valid,c100_test,in16_valid,in16_test\n'
                     f'0,{G.NB201_BEST},91.6,94.4,73.5,73.5,46.4,46.3\n')
    for dataset, score in (('cifar10', (91.6, 94.4)), ('cifar100', (73.5, 73.5)), ('imagenet16-120', (46.4, 46.3))):
        rows = search.load_nb201_table(str(table), dataset)
        assert search.nb201_score(rows, G.NB201_BEST, dataset) == dict(zip(('valid', 'test'), score)), dataset
    assert search.nb201_score(rows, G.NB201_PAPER, 'cifar10') is None   # a cell the table lacks
    assert "scores 1 of NAS-Bench-201's 15,625 cells" in capsys.readouterr().err
    # a dataset NAS-Bench-201 has no columns for (a --redecode or analyze of an SVHN run) goes unscored, not by
    # CIFAR-10's columns
    assert search.nb201_score(rows, G.NB201_BEST, 'svhn') is None
    assert search.nb201_score(rows, G.DARTS_V2, 'cifar10') is None   # a DARTS-space genotype
    table.write_text(f'arch,c10_valid,c10_test\n{G.NB201_BEST},91.6,94.4\n')
    with pytest.raises(search.RunError, match='c100_valid'):
        search.load_nb201_table(str(table), 'cifar100')


@pytest.mark.parametrize('method', ['midas', 'darts'])
def test_removing_an_edge_or_a_candidate_is_what_its_weights_at_zero_would_give(method):
    """Perturbation selection's removals: a cut edge adds exactly nothing to its node (what 'none' winning all of
    the edge's weight gives), under the topology (MIDAS) and without it (DARTS); a removed candidate gets weight 0
    and its edge's softmax renormalises over the rest."""
    torch.manual_seed(0)
    net = SearchNetwork('darts', 4, 10, 3, cfg=ArchConfig(method=method, topology=method == 'midas')).eval()
    x = torch.randn(2, 3, 32, 32)
    e, j = 7, G.PRIMITIVES.index('sep_conv_3x3')   # edge 7: node 4 <- state 2 (a node of four inputs)
    none = G.PRIMITIVES.index('none')
    removed = lambda: {t: (torch.zeros(14, 8, dtype=torch.bool), torch.zeros(14, dtype=torch.bool))
                       for t in ('normal', 'reduce')}
    net.removed = removed()
    net.removed['normal'][1][e] = True
    rec = Recorder()
    with torch.no_grad():
        cut = net(x, recorder=rec)
    normal = [c for c in rec.calls if not c[0].reduction and c[1] == 2]   # node 4 of each normal cell
    if method == 'midas':   # every pair holding the edge is out of the pair softmax: its gamma is 0, the rest sum to 2
        held = [p for p, pair in enumerate(G.node_pairs(4)) if 2 in pair]
        assert all(torch.all(gamma[2] == 0) and torch.allclose(gamma.sum(0), torch.full_like(gamma[0], 2.0))
                   and torch.all(pi[held] == 0) for _, _, _, gamma, pi in normal)
    net.removed = None
    with torch.no_grad():
        if method == 'darts':
            net.alphas['normal'][e] = 0.0
            net.alphas['normal'][e, none] = 1e4   # softmax: weight exactly 1 on 'none', 0 on the live candidates
            assert torch.allclose(net(x), cut, atol=1e-6)
        else:
            assert not torch.allclose(net(x), cut, atol=1e-4)   # the cut changed the output
    net.removed = removed()
    net.removed['normal'][0][e, j] = True
    rec = Recorder()
    with torch.no_grad():
        net(x, recorder=rec)
    for cell, n, w, _, _ in rec.calls:
        if not cell.reduction and n == 2:
            assert torch.all(w[2][:, j] == 0) and torch.allclose(w[2].sum(1), torch.ones_like(w[2][:, 0]))
            assert torch.all(w[1][:, j] > 0)   # another edge of the same node keeps it


@pytest.mark.parametrize('space, cfg', [('nb201', dict(token_bn=True)), ('nb201', dict(decorrelate=True)),
                                        ('s4', {})])
def test_removal_costs_shared_out_over_ranks_sum_to_one_processes(space, cfg, monkeypatch):
    """Under torchrun each rank measures whole batches and the losses are summed (here by hand: reduce_sum made the
    identity, each rank's loss its own part): --token-bn and --decorrelate normalise by a batch's moments, so a rank
    with part of a batch would measure other losses. S4's 'noise' draws one stream through the batches: every rank
    measures them all."""
    torch.manual_seed(0)
    net = SearchNetwork(space, 4, 10, 3, 1, ArchConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(2 if space == 's4' else 3)]   # s4: every rank measures both, a third adds nothing
    alone = search.removal_costs(net, batches)
    monkeypatch.setattr(search, 'reduce_sum', lambda t, world: t)
    ranks = [search.removal_costs(net, batches, rank, 2) for rank in (0, 1)]

    def flat(c):
        return [v for t in G.cell_types(net.kind) for row in c[t]['weights'] for v in row if v is not None]

    if space == 's4':
        assert ranks[0] == ranks[1] == alone
        return
    assert sum(r['base_loss'] for r in ranks) == pytest.approx(alone['base_loss'], rel=1e-6)
    assert np.allclose(np.add(flat(ranks[0]), flat(ranks[1])), flat(alone), rtol=0, atol=2e-6)   # float32 losses


@pytest.mark.parametrize('space', ['nb201', 's3'])   # s3: a DARTS-style cell (edge removals too) with few candidates
def test_removal_costs_are_the_loss_rise_of_each_removal_alone(space):
    """A removal's cost is the loss with that one thing removed less the loss with nothing removed (positive: it
    hurts to lose it), and each is measured alone: a mark left from the removal before would remove both. The
    last candidate of the last edge and the last edge are measured after all the others, so a leftover mark
    shows there."""
    torch.manual_seed(0)
    net = SearchNetwork(space, 4, 10, 3, 1, ArchConfig())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))]
    grad_modes = []   # the removals are forward passes only: a graph built for each would be memory for nothing
    hook = net.register_forward_hook(lambda module, inputs, output: grad_modes.append(torch.is_grad_enabled()))
    costs = search.removal_costs(net, batches)
    hook.remove()
    assert len(grad_modes) == costs['removals'] + 1 and not any(grad_modes)
    assert net.training and net.removed is None   # left as it was
    net.eval()
    types = G.cell_types(net.kind)

    def loss(t=None, e=None, j=None):
        net.removed = {k: (torch.zeros(len(net.space[k]), len(net.space[k][0]), dtype=torch.bool),
                           torch.zeros(len(net.space[k]), dtype=torch.bool)) for k in types}
        if j is not None:
            net.removed[t][0][e, j] = True
        elif e is not None:
            net.removed[t][1][e] = True
        with torch.no_grad():
            total = sum(F.cross_entropy(net(x), y, reduction='sum') for x, y in batches)
        net.removed = None
        return total.item() / 4

    base = loss()
    assert costs['base_loss'] == pytest.approx(base, abs=1e-7)   # the same computation: the same float32
    t = types[-1]
    e = len(net.space[t]) - 1
    j = len(net.space[t][e]) - 1
    mine = loss(t, e, j) - base
    assert abs(mine) > 1e-5 and costs[t]['weights'][e][j] == pytest.approx(mine, abs=1e-7)
    first = next(k for k, op in enumerate(net.space[types[0]][0]) if op != 'none')
    assert costs[types[0]]['weights'][0][first] == pytest.approx(loss(types[0], 0, first) - base, abs=1e-7)
    if net.kind == 'darts':   # node 5 (five inputs): its pair (3, 4) costs the removal of edge 12 plus that of edge 13
        cut = [loss(t, k) - base for k in (12, 13)]
        assert abs(cut[1]) > 1e-5 and costs[t]['pairs'][3][-1] == pytest.approx(sum(cut), abs=1e-7)


def test_removal_costs_hessian_and_decode_of_s4_read_one_draw_of_its_noise():
    """RDARTS S4's 'noise' candidate draws afresh at every forward, eval mode too. Measured against fresh noise,
    a removal's cost was mostly the difference of two draws (the supernet's loss varied by 0.006 between calls, more
    than the median cost, 0.005; the chosen normal cell changed on 6 of 8 edges with the global seed), and power
    iteration multiplied by another Hessian at every step. Each measurement now reads one fixed draw."""
    torch.manual_seed(0)
    net = SearchNetwork('s4', 4, 10, 3, 1, ArchConfig())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g))]
    runs, args = [], argparse.Namespace(space='s4', decode_none='exclude', topology=True, seed=0)
    for seed in (1, 2):   # the global random state the search left behind (another on every rank)
        torch.manual_seed(seed)
        runs.append((search.removal_costs(net, batches),
                     search.hessian_eigenvalue(net, net.arch_parameters(), net.weight_parameters(), batches, iters=3),
                     search.decode(net, batches, args)))
        after = torch.rand(1)   # and none of them took a draw from it
        torch.manual_seed(seed)
        assert torch.equal(after, torch.rand(1))
    assert runs[0] == runs[1]


def _float64_supernet(method, space='nb201'):
    model, weights, _, x, y = _step_setup(method, space)
    model = model.double().to(memory_format=torch.channels_last).eval()
    return model, weights, x.double().contiguous(memory_format=torch.channels_last), y


def _gradient_at(model, params, x, y, shift):
    """The mean loss's gradient with params moved by shift (then put back), through the supernet's usual paths."""
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, shift):
            p.add_(d)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize('method', ['midas', 'darts'])
def test_hessian_vector_product_is_the_gradients_derivative(method):
    """search.hessian_vector_product, summed over two batches by double backward through the plain-op paths, against
    central differences of the gradient the hand-fused Functions make (float64)."""
    model, _, x, y = _float64_supernet(method)
    params = model.arch_parameters()
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    v = [u / torch.cat([w.flatten() for w in v]).norm() for u in v]
    hv = torch.cat([h.flatten() for h in search.hessian_vector_product(model, params, [(x[:5], y[:5]), (x[5:], y[5:])],
                                                                       v)])
    eps = 1e-7   # a step that crosses no ReLU's kink: every pre-activation depends on the architecture here
    fd = (_gradient_at(model, params, x, y, [eps * u for u in v])
          - _gradient_at(model, params, x, y, [-eps * u for u in v])) / (2 * eps)
    assert fd.abs().max() > 1e-5   # a curvature to measure
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())


@pytest.mark.parametrize('method, space', [('midas', 'nb201'), ('darts', 'nb201'), ('midas', 's3')])
def test_a_second_derivative_through_the_fused_functions_is_exact(method, space):
    """Whoever copies model.py and differentiates twice (an exact Hessian-vector product, a gradient penalty) without
    twice_differentiable() goes through the hand-fused Functions: their backwards, asked for a graph, must give the
    plain ops' second derivative. Once marked once_differentiable, they dropped its terms silently (0.36-0.75 off),
    and a map given beside its own descendant (a state and a convolution of it) counted twice."""
    model, _, x, y = _float64_supernet(method, space)
    params = model.arch_parameters()
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def hvp():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        return torch.cat([h.flatten() for h in torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v)),
                                                                    params)])

    fused = hvp()
    with twice_differentiable():
        plain = hvp()
    assert plain.abs().max() > 1e-4
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-12 * plain.abs().max().item())


def test_hessian_eigenvalue_is_the_largest_of_the_whole_hessian():
    """DARTS's NB201 alpha (6 x 5): the full Hessian by central differences of the gradient, one column per
    parameter; power iteration finds its eigenvalue of largest magnitude, and leaves the weights and the random
    state as they were."""
    model, weights, x, y = _float64_supernet('darts')
    params = model.arch_parameters()
    n = sum(p.numel() for p in params)
    eps, cols = 1e-7, []   # larger steps cross ReLU kinks along some axes: 1e-5 is off by 6x on this one
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = eps
        shift = list(e.split([p.numel() for p in params]))
        shift = [d.view(p.shape) for d, p in zip(shift, params)]
        cols.append((_gradient_at(model, params, x, y, shift)
                     - _gradient_at(model, params, x, y, [-d for d in shift])) / (2 * eps))
    eigs = torch.linalg.eigvalsh((torch.stack(cols) + torch.stack(cols).T) / 2)
    largest = eigs[eigs.abs().argmax()].item()
    state = torch.get_rng_state()
    model.train()
    got, settled = search.hessian_eigenvalue(model, params, weights, [(x, y)], seed=0, iters=500)
    assert got == pytest.approx(largest, rel=2e-3) and abs(largest) > 1e-3 and settled
    assert not search.hessian_eigenvalue(model, params, weights, [(x, y)], seed=0, iters=1)[1]  # one step: no test
    assert model.training and all(p.requires_grad for p in weights) and torch.equal(torch.get_rng_state(), state)


def test_search_hessian_samples_measures_without_changing_the_search(cifar, tmp_path):
    runs = []
    for extra in ([], ['--hessian-samples', '12']):
        save = str(tmp_path / f'run{len(runs)}')
        torch.manual_seed(0)
        arch = search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY[2:], '--epochs', '2', *extra])
        with open(os.path.join(save, 'history.json')) as f:
            history = json.load(f)
        state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)['model']
        runs.append((arch, history, state))
    (arch, plain, state), (arch_h, measured, state_h) = runs
    assert arch == arch_h and all(torch.equal(state[k], state_h[k]) for k in state)
    assert [h['genotype'] for h in plain] == [h['genotype'] for h in measured]
    assert all('hessian_eig' not in h for h in plain)
    eig = [h['hessian_eig'] for h in measured]
    assert len(eig) == 2 and all(math.isfinite(e) and e != 0 for e in eig) and eig[0] != eig[1]


@pytest.mark.parametrize('space', ['nb201', 's3'])
def test_select_perturb_picks_what_costs_most_to_remove_and_a_finished_run_chooses_again(cifar, tmp_path, space):
    save = str(tmp_path / 'run')
    torch.manual_seed(0)
    by_weights = search.main(['--data', cifar, '--save', save, '--space', space, *TINY])
    ckpt = os.path.join(save, 'checkpoint.pt')
    before = os.stat(ckpt).st_mtime_ns
    chosen = search.main(['--resume', save, '--select', 'perturb', '--select-samples', '24'])
    assert os.stat(ckpt).st_mtime_ns == before   # a finished run is not searched again: only the choice is made
    with open(os.path.join(save, 'genotype.json')) as f:
        out = json.load(f)
    assert out['select'] == 'perturb' and G.genotype_from_json(out)[0] == chosen
    G.validate_genotype(chosen, space)
    with open(os.path.join(save, 'weights.json')) as f:
        record = json.load(f)
    costs = record['removal_costs']
    assert G.genotype_from_json(record['by_weights']['genotype'])[0] == by_weights
    for t in (('normal',) if space == 'nb201' else ('normal', 'reduce')):
        ops_per_edge = G.get_space(space)[t]
        table = costs[t]['weights']
        assert all((c is None) == (op == 'none') for ops, row in zip(ops_per_edge, table) for op, c in zip(ops, row))
        best = [max((c, -k, op) for k, (op, c) in enumerate(zip(ops, row)) if op != 'none')[2]
                for ops, row in zip(ops_per_edge, table)]
        if space == 'nb201':
            assert G.nb201_parse(chosen) == best
        else:
            cell, e0 = getattr(chosen, t), 0
            for k, (_, inputs) in enumerate(G.node_inputs('darts')):
                pairs = G.node_pairs(len(inputs))
                kept = pairs[max(range(len(pairs)), key=lambda p: costs[t]['pairs'][k][p])]
                assert [i for _, i in cell[2 * k:2 * k + 2]] == sorted(kept)
                assert [op for op, _ in cell[2 * k:2 * k + 2]] == [best[e0 + i] for i in sorted(kept)]
                e0 += len(inputs)
    # the costs were measured: removing something changes the loss (a cost of exactly 0 everywhere would mean not)
    types = [t for t in ('normal', 'reduce') if t in costs]
    assert any(c for t in types for row in costs[t]['weights'] for c in row if c is not None)
    edges = 0 if space == 'nb201' else 2 * (3 + 4 + 5)   # DARTS: the edges of the nodes of 3, 4 and 5 inputs
    assert costs['removals'] == sum(c is not None for t in types for row in costs[t]['weights'] for c in row) + edges


def _arch_state(save):
    state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)['model']
    return {k: v for k, v in state.items() if 'attention' in k or 'alphas' in k}


def test_same_seed_same_result(cifar, tmp_path):
    """One thread, one seed: the same supernet, in this process and in a fresh one; another seed, another."""
    args = ['--data', cifar, '--space', 's3', '--epochs', '2', *TINY[2:]]
    genotypes = [search.main([*args, '--save', str(tmp_path / 'run0')])]
    r = run_script('search.py', *args, '--save', str(tmp_path / 'run1'))   # OMP_NUM_THREADS=1, as this process
    assert r.returncode == 0, r.stderr
    search.main([*args, '--save', str(tmp_path / 'seed1'), '--seed', '1'])
    for run in ('run1', 'seed1'):
        with open(tmp_path / run / 'genotype.json') as f:
            genotypes.append(G.genotype_from_json(json.load(f))[0])
    assert genotypes[0] == genotypes[1]
    state = {run: torch.load(tmp_path / run / 'checkpoint.pt', weights_only=False)['model']
             for run in ('run0', 'run1', 'seed1')}
    assert _same_weights(state['run0'], state['run1'])
    assert not any(torch.equal(state['run0'][k], state['seed1'][k]) for k in state['run0'] if 'attention' in k)


def test_architecture_steps_read_search_val_and_weight_steps_search_train(cifar, tmp_path, monkeypatch):
    """§7: each iteration an architecture step on a search-val batch, then a weight step on a search-train batch.
    Batches of the wrong half train the architecture on the weights' own images (DARTS's overfitting to them)."""
    calls = []
    arch_step, weight_step = search.arch_step, search.weight_step

    def record(name, step):
        def wrapped(model, params, opt, x, y, *args, **kw):
            calls.append((name, x.clone(), y.clone()))
            return step(model, params, opt, x, y, *args, **kw)
        return wrapped

    monkeypatch.setattr(search, 'arch_step', record('arch', arch_step))
    monkeypatch.setattr(search, 'weight_step', record('weight', weight_step))
    search.main(['--data', cifar, '--save', str(tmp_path / 'run'), '--space', 'nb201', *TINY])
    assert [c[0] for c in calls] == ['arch', 'weight'] * 2   # 16 search-train images in batches of 8
    x, y = data.load_dataset('cifar10', cifar, download=False)
    x, y = x[:32], y[:32]   # --subset 32
    meta = data.DATASETS['cifar10']
    halves = data.split_indices(32, 0.5)
    expected = {}
    for name, idx, seed in (('weight', halves[0], 0), ('arch', halves[1], 1)):   # the loaders of main, seed + 1
        q = data.GPULoader(x[idx], y[idx], 8, meta['mean'], meta['std'], crop_pad=meta['crop_pad'], seed=seed)
        expected[name] = [q.next_batch() for _ in range(2)]
    assert not torch.equal(torch.cat([b[1] for b in expected['arch']]), torch.cat([b[1] for b in expected['weight']]))
    for name in ('arch', 'weight'):
        got = [c for c in calls if c[0] == name]
        for (_, xb, yb), (xe, ye) in zip(got, expected[name]):
            assert torch.equal(yb, ye) and torch.equal(xb, xe), name


@pytest.mark.parametrize('space', ['nb201', 's4'])
def test_search_torchrun_two_ranks_hold_one_supernet(cifar, tmp_path, space):
    """Under torchrun the architecture and weight gradients and the BN statistics are averaged over the
    ranks: both end with the same supernet and decode the same genotype (S4's: its 'noise' draws per rank in
    training, and one fixed draw in every decode). --select perturb's removal costs are shared out over the ranks
    and summed: the costs one process measures on the same supernet."""
    save = str(tmp_path / 'ddp')
    perturb = ['--select', 'perturb'] if space == 'nb201' else []
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'search.py',
                   '--data', cifar, '--save', save, '--space', space, '--epochs', '2', *TINY[2:], *perturb,
                   env={'MIDAS_RANK_STATES': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(os.path.join(save, f'rank{k}-state.pt'), weights_only=True) for k in (0, 1))
    assert a['genotype'] == b['genotype'] and a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert any('running_mean' in k for k in a['model'])  # the BN statistics are compared too
    assert 'world 2' in open(os.path.join(save, 'log.txt')).read()
    if space == 's4':
        return
    init = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(method='midas', patch=4, topology=False)).state_dict()
    moved = [k for k in init if 'attention' in k and not torch.equal(init[k], a['model'][k])]
    assert moved, 'the architecture did not train'
    with open(os.path.join(save, 'genotype.json')) as f:
        assert len(G.nb201_parse(json.load(f)["arch"])) == 6
    # the ranks built one supernet from one seed, then draw apart (S4's 'noise' candidates), and the checkpoint
    # resumes each rank's own generator
    ckpt = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    assert len(ckpt['rng']) == 2 and not torch.equal(ckpt['rng'][0]['cpu'], ckpt['rng'][1]['cpu'])
    assert 'search-val images (shared out over 2 processes)' in open(
        os.path.join(save, 'log.txt')).read()
    with open(os.path.join(save, 'weights.json')) as f:
        shared = json.load(f)['removal_costs']
    r = run_script('search.py', '--resume', save, '--select', 'perturb')   # one process: every image itself
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(save, 'weights.json')) as f:
        alone = json.load(f)['removal_costs']
    assert shared['images'] == alone['images'] == 16 and shared['removals'] == alone['removals'] == 24
    assert shared['base_loss'] == pytest.approx(alone['base_loss'], rel=1e-5)
    assert np.allclose([c for row in shared['normal']['weights'] for c in row if c is not None],
                       [c for row in alone['normal']['weights'] for c in row if c is not None], rtol=1e-4, atol=1e-6)

def test_a_resume_on_another_number_of_processes_says_so(cifar, tmp_path):
    """Each rank's BN normalises its own slice of the global batch, so a run resumed on another number of
    processes goes on as neither run: the log says so (a checkpoint of older code, which has no count, says
    nothing)."""
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY])
    path = os.path.join(save, 'checkpoint.pt')
    state = torch.load(path, weights_only=False)
    assert state['world'] == 1
    state['world'] = 2
    torch.save(state, path)
    search.main(['--resume', save])
    assert 'it ran as 2 processes and goes on as 1: each BN now normalises batches of 8 images, not 4' in \
        open(os.path.join(save, 'log.txt')).read()


# MIM's masks: a generator seeded per epoch; --aux-skip: a weight set per epoch
@pytest.mark.parametrize('flags', [[], ['--mim', '0.5', '--aux-skip']])
def test_resume_after_sigkill_equals_uninterrupted_run(cifar, tmp_path, flags):
    args = ['search.py', '--data', cifar, '--space', 'nb201', '--epochs', '3', '--batch-size', '8',
            '--init-channels', '4', '--cells', '1', '--subset', '160', '--epoch-decode-samples', '16',
            '--decode-samples', '16', '--device', 'cpu', '--no-download', *flags]
    full = str(tmp_path / 'full')
    r = run_script(*args, '--save', full)
    assert r.returncode == 0, r.stderr

    killed = str(tmp_path / 'killed')
    ckpt = kill_after_first_checkpoint(args, killed)
    state = torch.load(ckpt, weights_only=False)
    assert state['epoch'] < 3
    assert not os.path.exists(os.path.join(killed, 'genotype.json'))
    if not flags:   # a checkpoint from before every rank's generator was kept resumes from its rank 0's
        (one,) = state.pop('rng')
        state['rng_cpu'], state['rng_cuda'] = one['cpu'], one['cuda']
        torch.save(state, ckpt)

    # the run's own flags, data and device, from its args.json; what may change (the data's path, the log's
    # frequency) changes nothing of the search
    moved = [] if flags else ['--data', str(shutil.copytree(cifar, tmp_path / 'moved')), '--report-freq', '3']
    stale = os.path.join(killed, '.tmp-k2j4checkpoint.pt')   # what SIGKILL or SIGTERM leaves of a save under way
    open(stale, 'wb').close()
    r = run_script('search.py', '--resume', killed, *moved)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(stale)
    for name in ('genotype.json', 'weights.json', 'history.json'):   # what it decoded from, too
        with open(os.path.join(full, name)) as f1, open(os.path.join(killed, name)) as f2:
            assert json.load(f1) == json.load(f2), name
    a, b = _arch_state(full), _arch_state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if flags:
        return
    # killed in its first epoch (its args.json written, no checkpoint yet): --resume runs it again from the start
    early = tmp_path / 'early'
    early.mkdir()   # killed before its args.json: nothing to resume, and the way to start it again
    (early / '.tmp-notes').touch()   # not a run's folder: its files are left alone
    _one_line_error(run_script('search.py', '--resume', str(early)), 'no readable args.json',
                    f'give its command again with --save {early}')
    (early / '.tmp-notes').unlink()
    shutil.copy(os.path.join(full, 'args.json'), early / 'args.json')
    _one_line_error(run_script('search.py', '--resume', str(early), '--save', full), 'continues in its own folder')
    # it starts again as the run it was: another flag is refused, and its args.json is left as it was
    _one_line_error(run_script('search.py', '--resume', str(early), '--epochs', '7'), 'another configuration',
                    'epochs=3', 'epochs=7')
    assert (early / 'args.json').read_text() == open(os.path.join(full, 'args.json')).read()
    r = run_script('search.py', '--resume', str(early))
    assert r.returncode == 0, r.stderr
    assert 'searching again from the start' in (early / 'log.txt').read_text()
    for name in ('genotype.json', 'weights.json'):
        with open(os.path.join(full, name)) as f1, open(early / name) as f2:
            assert json.load(f1) == json.load(f2), name


def test_a_checkpoint_save_that_dies_midway_leaves_the_last_whole_one(cifar, tmp_path, monkeypatch):
    """Checkpoints go to a temp file that is then renamed: a save that dies halfway (a full disk, a kill) leaves the
    previous checkpoint whole and no stray file, and --resume goes on from it."""
    save = str(tmp_path / 'run')
    ckpt = os.path.join(save, 'checkpoint.pt')
    real_save, saves = torch.save, []

    def dies_at_the_second(obj, f, *args, **kw):
        saves.append(obj.get('epoch'))
        if len(saves) == 2:
            f.write(b'half a checkpoint')
            raise OSError('No space left on device')
        return real_save(obj, f, *args, **kw)
    monkeypatch.setattr(torch, 'save', dies_at_the_second)
    with pytest.raises(OSError, match='No space left'):
        search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY, '--epochs', '2'])
    monkeypatch.setattr(torch, 'save', real_save)
    assert saves == [1, 2] and torch.load(ckpt, weights_only=False)['epoch'] == 1
    assert [n for n in os.listdir(save) if n.startswith('.tmp-')] == []
    search.main(['--resume', save])
    assert torch.load(ckpt, weights_only=False)['epoch'] == 2 and os.path.isfile(os.path.join(save, 'genotype.json'))


def test_train_portion_splits_the_training_set_in_file_order(cifar, tmp_path):
    """DARTS's split: the first floor(n * portion) images train the weights, the rest the architecture."""
    train_idx, val_idx = data.split_indices(10, 0.7)
    assert train_idx.tolist() == list(range(7)) and val_idx.tolist() == [7, 8, 9]
    for portion in (0.0, 0.05, 1.0):
        with pytest.raises(data.DataError, match='leaves one side of the search split empty'):
            data.split_indices(10, portion)
    save = tmp_path / 'run'
    search.main(['--data', cifar, '--save', str(save), '--space', 'nb201', *TINY, '--train-portion', '0.75'])
    assert '24+8 images' in (save / 'log.txt').read_text()


def test_decode_reads_the_first_n_images_every_time():
    """Every decode reads the same first n images of the split, exactly n, whatever was read before: the loader
    keeps its position, and a decode that went on from it read a window that moved from epoch to epoch (and a
    resumed run decoded other images than an uninterrupted one)."""
    x, y = torch.randint(0, 256, (600, 3, 8, 8), dtype=torch.uint8), torch.arange(600)
    q = data.GPULoader(x, y, 256, (0.5,) * 3, (0.25,) * 3, shuffle=False, drop_last=False, augment=False)
    first = [yb for _, yb in search.decode_batches(q, 300, 'midas')]
    assert [len(b) for b in first] == [256, 44] and torch.equal(torch.cat(first), torch.arange(300))
    again = torch.cat([yb for _, yb in search.decode_batches(q, 300, 'midas')])
    assert torch.equal(again, torch.arange(300))
    assert torch.equal(torch.cat([yb for _, yb in search.decode_batches(q, 0, 'midas')]), torch.arange(600))
    assert torch.equal(torch.cat([yb for _, yb in search.decode_batches(q, 5000, 'midas')]), torch.arange(600))
    assert [len(yb) for _, yb in search.decode_batches(q, 300, 'darts')] == [256]  # a static table: one batch


@pytest.mark.parametrize('space', ['nb201', 's3'])
def test_averaged_weights_are_a_mean_over_images_not_batches(space):
    """§8 averages w (and gamma, pi) over the decode set's images: a last, shorter batch must count for its images,
    not as much as a full one. In eval mode an image's weights do not depend on its batch, so any split of the
    images gives the average of the whole."""
    from model import average_weights
    torch.manual_seed(0)
    model = SearchNetwork(space, C=4, layers=3, cells=1)
    x = torch.randn(5, 3, 16, 16)
    whole = average_weights(model, [(x, None)])
    split = average_weights(model, [(x[:4], None), (x[4:], None)])
    by_batch = [average_weights(model, [(part, None)]) for part in (x[:4], x[4:])]
    def flat(rows):   # pairs are ragged: one list per node
        return torch.tensor([v for row in rows for v in (row if isinstance(row, list) else [row])])

    for t in whole:
        for key in ('weights', 'gamma', 'pairs'):
            if whole[t][key] is None:
                continue
            torch.testing.assert_close(flat(split[t][key]), flat(whole[t][key]), rtol=0, atol=1e-6)
    of_batches = sum(torch.tensor(b['normal']['weights']) for b in by_batch) / 2
    assert (of_batches - torch.tensor(whole['normal']['weights'])).abs().max() > 1e-5   # the split does tell


def test_batched_augmentation_is_pad_crop_flip_normalise_cutout_image_by_image():
    """The batched crop, flip and cutout (one indexing op on a padded [image | mirror] store) must equal DARTS's
    per-image transforms: zero-pad by p, crop H x W at a shift drawn from 0..2p (both ends), mirror when drawn,
    normalise, zero a length x length square. Every pixel of an image is distinct, so a crop one pixel off shows."""
    n, h, w, p, length = 64, 8, 8, 3, 4
    x = (torch.arange(n * 3 * h * w) % 251 + 1).to(torch.uint8).view(n, 3, h, w)
    mean, std = data.DATASETS['cifar10']['mean'], data.DATASETS['cifar10']['std']
    out = data.augment_batch(x, torch.Generator().manual_seed(0), crop_pad=p, flip=True, cutout=length,
                             mean=mean, std=std)
    drawn = data._draw(n, torch.Generator().manual_seed(0), (h, w), p, True, length)   # the same draws
    assert drawn['flip'].any() and not drawn['flip'].all()
    padded = F.pad(x, (p,) * 4)
    for i in range(n):
        r, c = drawn['shift'][i].tolist()
        img = padded[i:i + 1, :, r:r + h, c:c + w]
        img = data.normalize(img.flip(-1) if drawn['flip'][i] else img, mean, std)[0]
        cy, cx = drawn['centre'][i].tolist()
        img[:, max(0, cy - length // 2):cy + length // 2, max(0, cx - length // 2):cx + length // 2] = 0
        assert torch.equal(out[i], img), i
    many = data._draw(2000, torch.Generator().manual_seed(1), (h, w), p, True, length)
    assert set(many['shift'].flatten().tolist()) == set(range(2 * p + 1))
    assert set(many['centre'].flatten().tolist()) == set(range(h))
    ones = data._cutout(torch.ones(1, 3, 12, 12), {'centre': torch.tensor([[6, 5]])}, length)
    zeroed = torch.zeros(12, 12, dtype=torch.bool)
    zeroed[4:8, 3:7] = True   # rows 6 - 2 .. 6 + 1, columns 5 - 2 .. 5 + 1
    assert all(torch.equal(ones[0, k] == 0, zeroed) for k in range(3))   # length^2 pixels per channel


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    """DARTS's drop_path: a sample's output is zeroed with probability p and the survivors scaled by 1/(1 - p),
    so the expected output is the input's (without the rescale the network sees weaker paths in training than in
    evaluation); p = 0 leaves the input as it is."""
    from model import drop_path
    torch.manual_seed(0)
    x = torch.ones(20000, 3, 2, 2)
    out = drop_path(x, 0.3)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.7))
    assert torch.equal(kept, kept[:, :1, :1, :1].expand_as(kept))   # a whole sample, every channel and pixel
    assert abs((~kept).float().mean().item() - 0.3) < 0.02 and abs(out.mean().item() - 1) < 0.03
    assert drop_path(x, 0.) is x


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, no traceback

def _one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize('flags, words', [
    (['--space', 'nope'], ["unknown search space 'nope'"]),
    (['--method', 'enas'], ["unknown method 'enas'"]),
    (['--patch', '-1'], ['patch']),
    (['--patch', '2.5'], ['--patch']),
    (['--patch', '64'], ['larger than']),
    (['--report-freq', '0'], ['--report-freq must be at least 1']),
    (['--lr', 'nan'], ['--lr must be positive and finite']),
    (['--grad-clip', '-1'], ['--grad-clip must be a finite number']),
    (['--momentum', '1'], ['--momentum must be in [0, 1)']),
    (['--nesterov', '--momentum', '0'], ['--nesterov needs a --momentum above 0']),
    (['--mim', 'nan'], ['--mim needs']),
    (['--ms-eps', 'nan'], ['--ms-eps >= 0']),   # without --mean-shift too: args.json's NaN would refuse every resume
    (['--decode-samples', '-5'], ['--decode-samples']),
    (['--select-samples', '-5'], ['--select-samples']),
    (['--select', 'best'], ['--select', 'perturb']),
    (['--subset', '-100'], ['--subset must be']),
    (['--subset', '100000'], ['--subset 100000:', 'training images']),
    (['--device', 'meta'], ["device 'meta' is not supported"]),
    (['--lr-min', '0.5'], ['--lr-min 0.5 is above --lr 0.025']),
    (['--tau', 'inf'], ['--tau must be positive and finite']),
    (['--tau', '0'], ['--tau must be positive and finite']),   # the flag named, not ArchConfig's field
    (['--attn-dim', '0'], ['--attn-dim must be at least 1']),
    (['--patch', '-1'], ['--patch must be 0 (global pooling) or a patch side']),
    (['--space', 'nb201', '--topology'], ['--topology does not apply to NAS-Bench-201']),   # it would be ignored
    (['--seed', '-1'], ['--seed must be in [0, 2**32)']),
    (['--nb201-table', ''], ['--nb201-table: an empty path']),
    (['--nb201-table', 'T.csv'], ['--nb201-table scores NAS-Bench-201 cells', '--space darts']),   # ignored
    (['--decorrelate', '--decorrelate-free'], ['drop --decorrelate-free']),   # ignored
    (['--decode-none', 'include'], ["--decode-none include is NAS-Bench-201's rule", '--space darts']),   # ignored
    (['--mim', '1', '--mim-ratio', '0.001'], ['--mim-ratio 0.001 masks none of the 64 patches of 4x4']),   # no MIM
])
def test_bad_flags(cifar, tmp_path, capsys, flags, words):
    r = _cli(search.main, capsys, '--data', cifar, '--save', str(tmp_path / 'r'), *TINY, *flags)   # no interpreter
    _one_line_error(r, *words)
    assert not os.path.exists(tmp_path / 'r')


def test_a_device_or_process_count_the_run_cannot_use_is_refused(cifar, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert train.pick_device('cuda:1') == torch.device('cuda', 1)
    with pytest.raises(train.RunError, match="device 'cuda:2' requested but this machine has 2 CUDA"):
        train.pick_device('cuda:2')
    # under torchrun each rank takes an equal slice of the global batch: 7 images do not split over 2 ranks
    monkeypatch.setattr(search, 'setup_distributed', lambda name: (0, 2, torch.device('cpu')))
    with pytest.raises(train.RunError, match='--batch-size 7 does not split evenly over 2 processes'):
        search.main(['--data', cifar, '--save', str(tmp_path / 'r'), *TINY, '--batch-size', '7'])
    assert not os.path.exists(tmp_path / 'r')


@pytest.mark.parametrize('script', ['search.py', 'train.py'])
def test_a_diverging_run_stops_in_one_line_and_an_empty_path_is_refused(cifar, tmp_path, script):
    """A loss gone to inf or NaN stops the run with one line (train.py wrote a report of NaN before); `--resume ""`
    (an unset shell variable) is refused, not read as no --resume at all."""
    flags = TINY if script == 'search.py' else ['--genotype', 'DARTS_V2', *TRAIN_TINY, '--layers', '3', '--epochs', '1']
    r = run_script(script, '--data', cifar, '--save', str(tmp_path / 'r'), *flags, '--lr', '1e30')
    _one_line_error(r, 'the loss is not finite at epoch 1')
    assert not os.path.exists(tmp_path / 'r' / 'report.json')
    _one_line_error(run_script(script, '--resume', ''), '--resume: an empty path')


@pytest.mark.parametrize('script', ['search.py', 'train.py'])
def test_a_network_too_large_for_memory_is_one_line_and_leaves_no_run_folder(cifar, tmp_path, script):
    """Out of memory is DARTS users' commonest complaint: it names the memory, the size asked for and the flags that
    shrink the run. 10**7 channels ask for petabytes, which no machine's allocator grants."""
    flags = TINY if script == 'search.py' else ['--genotype', 'DARTS_V2', *TRAIN_TINY, '--layers', '3', '--epochs', '1']
    r = run_script(script, '--data', cifar, '--save', str(tmp_path / 'r'), *flags, '--init-channels', str(10**7))
    _one_line_error(r, 'out of host memory (tried to allocate ', ' GiB)', '--batch-size', '--init-channels')
    assert not os.path.exists(tmp_path / 'r')


def test_out_of_memory_errors_are_told_apart_from_other_runtime_errors():
    cuda = torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of '
                                  '79.19 GiB of which 3.06 MiB is free.')
    assert train.out_of_memory(cuda).startswith('out of device memory (tried to allocate 20.00 MiB)')
    assert train.out_of_memory(RuntimeError('MPS backend out of memory')).startswith(
        'out of device memory (tried to allocate more than is free)')
    mps = RuntimeError('MPS backend out of memory (MPS allocated: 9.1 GB). Tried to allocate 4096 bytes on a pool.')
    assert train.out_of_memory(mps).startswith('out of device memory (tried to allocate 4,096 bytes)')
    bug = RuntimeError('mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)')
    assert train.out_of_memory(bug) is None

    def fail(error):
        raise error
    with pytest.raises(SystemExit) as stop:   # out of memory: one line, exit 2
        train.run_cli(lambda argv: fail(cuda))
    assert stop.value.code == 2
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied'):   # a bug keeps its traceback
        train.run_cli(lambda argv: fail(bug))


def test_bf16_probe_agrees_with_the_dil_conv_op():
    """search.py refuses --amp bf16 on the CPU where dilated_bf16_grads_ok() finds the kernel wrong (torch 2.13.0's
    is): the probe must say so exactly when DARTS's own dil_conv ops, run as a search runs them (channels-last
    maps, CPU autocast), get another weight gradient than in float32."""
    from ops import OPS
    torch.manual_seed(0)
    agree = []
    for name in ('dil_conv_3x3', 'dil_conv_5x5'):
        op = OPS[name](8, 1, False).to(memory_format=torch.channels_last)
        x = torch.randn(4, 8, 32, 32).contiguous(memory_format=torch.channels_last)
        g = torch.randn(4, 8, 32, 32)
        found = []
        for bf16 in (False, True):
            op.zero_grad()
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                out = op(x.clone().requires_grad_())
            (out.float() * g).sum().backward()
            found.append(op[1].weight.grad.clone())   # the dilated depthwise convolution's
        exact, half = found
        agree.append(bool(torch.isfinite(half).all()) and (half - exact).abs().max() <= 0.05 * exact.abs().max())
    assert agree[0] == agree[1] == search.dilated_bf16_grads_ok()


def test_compile_on_the_cpu_refused_where_torchinductor_fails_on_the_supernet(cifar, tmp_path, monkeypatch):
    """--compile on the CPU with a torch whose TorchInductor fails on the supernet's backward (2.5-2.10): one error
    line and no run folder, from search.py and bench.py, rather than a crash minutes into the first step."""
    import bench
    from torch.torch_version import TorchVersion
    monkeypatch.setattr(torch, '__version__', TorchVersion('2.10.0+cpu'))
    with pytest.raises(search.RunError, match='--compile on the CPU needs torch >= 2.11'):
        search.main(['--data', cifar, '--save', str(tmp_path / 'run'), *TINY, '--space', 'nb201', '--compile'])
    assert not os.path.exists(tmp_path / 'run')
    with pytest.raises(search.RunError, match='--no-compile'):
        bench.main(['--device', 'cpu', '--space', 'nb201', '--compile', '--skip', 'memory,train,data'])


def test_bf16_on_the_cpu_refused_only_for_dilated_convolutions(cifar, tmp_path, monkeypatch):
    """With a CPU kernel that gets them wrong, --amp bf16 in a space with dil_conv gives one error line and writes
    nothing; a space without them searches in bf16 to the end (the autocast path a GPU takes by default)."""
    monkeypatch.setattr(search, 'dilated_bf16_grads_ok', lambda: False)
    for space in ('darts', 's1'):
        with pytest.raises(search.RunError, match='--amp off'):
            search.main(['--data', cifar, '--save', str(tmp_path / space), *TINY, '--space', space, '--amp', 'bf16'])
        assert not os.path.exists(tmp_path / space)
    save = str(tmp_path / 'nb201')
    dtypes = set()   # what the training steps' convolutions computed in: recorded as bf16 is not enough
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: dtypes.add(out.dtype) if isinstance(m, torch.nn.Conv2d) and m.training else None)
    try:
        search.main(['--data', cifar, '--save', save, *TINY, '--space', 'nb201', '--amp', 'bf16'])
    finally:
        hook.remove()
    assert dtypes == {torch.bfloat16}
    with open(os.path.join(save, 'genotype.json')) as f:
        assert len(G.nb201_parse(json.load(f)['arch'])) == 6
    with open(os.path.join(save, 'args.json')) as f:
        assert json.load(f)['amp'] == 'bf16'


def test_missing_and_corrupt_data(cifar, tmp_path):
    r = run_script('search.py', '--data', str(tmp_path / 'nowhere'), '--save', str(tmp_path / 'r'), *TINY)
    _one_line_error(r, 'cifar-10-batches-py')
    assert not os.path.exists(tmp_path / 'r')
    broken = tmp_path / 'broken'
    data.write_cifar_like(str(broken), 'cifar10', 100, 20)
    batch = broken / 'cifar-10-batches-py' / 'data_batch_1'
    batch.write_bytes(batch.read_bytes()[:1000])
    r = run_script('search.py', '--data', str(broken), '--save', str(tmp_path / 'r2'), *TINY)
    _one_line_error(r, 'data_batch_1')


def test_cifar_download_checks_the_archive_and_survives_a_second_downloader(cifar, tmp_path, monkeypatch):
    """The download path, from a file:// URL: md5 checked, the archive unpacked into place; a second process that
    downloads at the same time (torchrun ranks on a fresh machine) keeps the copy the first put there; an archive
    with an entry outside its folder is refused."""
    import hashlib
    import tarfile
    archive = tmp_path / 'cifar.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(os.path.join(cifar, 'cifar-10-batches-py'), arcname='cifar-10-batches-py')
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    entry = data._CIFAR['cifar10']
    monkeypatch.setitem(data._CIFAR, 'cifar10', (entry[0], archive.as_uri(), md5, *entry[3:]))
    root = str(tmp_path / 'root')
    x, y = data.load_dataset('cifar10', root, train=True, download=True)
    assert x.shape == (200, 3, 32, 32) and len(y) == 200
    data._download_cifar('cifar10', root)   # the later of two downloaders: the folder is there already
    assert sorted(os.listdir(root)) == ['cifar-10-batches-py']   # no temporary left behind
    assert torch.equal(data.load_dataset('cifar10', root, train=True, download=False)[0], x)
    monkeypatch.setitem(data._CIFAR, 'cifar10', (entry[0], archive.as_uri(), '0' * 32, *entry[3:]))
    with pytest.raises(data.DataError, match='md5'):
        data.load_dataset('cifar10', str(tmp_path / 'other'), train=True, download=True)
    evil = tmp_path / 'evil.tar.gz'
    with tarfile.open(evil, 'w:gz') as tar:
        tar.add(os.path.join(cifar, 'cifar-10-batches-py', 'test_batch'), arcname='../test_batch')
    monkeypatch.setitem(data._CIFAR, 'cifar10',
                        (entry[0], evil.as_uri(), hashlib.md5(evil.read_bytes()).hexdigest(), *entry[3:]))
    with pytest.raises(data.DataError, match='unexpected entry'):
        data.load_dataset('cifar10', str(tmp_path / 'third'), train=True, download=True)
    assert not os.path.exists(tmp_path / 'test_batch')


def test_labels_out_of_range_and_tables_without_the_columns_are_refused_up_front(cifar, tmp_path):
    bad = tmp_path / 'labels'
    data.write_cifar_like(str(bad), 'cifar10', 100, 20)
    path = bad / 'cifar-10-batches-py' / 'data_batch_1'
    with open(path, 'rb') as f:
        batch = pickle.load(f, encoding='bytes')
    key = b'labels' if b'labels' in batch else 'labels'
    batch[key] = [10] + list(batch[key])[1:]
    with open(path, 'wb') as f:
        pickle.dump(batch, f)
    _one_line_error(run_script('search.py', '--data', str(bad), '--save', str(tmp_path / 'r'), *TINY),
                    'labels outside 0..9')
    batch[key] = [0] + batch[key][1:]
    batch[b'data' if b'data' in batch else 'data'] = batch[b'data' if b'data' in batch else 'data'] * 300.0
    with open(path, 'wb') as f:   # float pixels would wrap around silently in a cast to uint8
        pickle.dump(batch, f)
    _one_line_error(run_script('search.py', '--data', str(bad), '--save', str(tmp_path / 'r'), *TINY),
                    'not the official uint8 pixels')
    table = tmp_path / 'table.csv'
    table.write_text('arch,c10_test\n' + G.NB201_BEST + ',94.37\n')
    r = run_script('search.py', '--data', cifar, '--save', str(tmp_path / 'r'), '--space', 'nb201',
                   '--nb201-table', str(table), *TINY)
    _one_line_error(r, 'needs columns arch, c10_valid, c10_test')
    assert not os.path.exists(tmp_path / 'r')


def _cli(main, capsys, *argv):
    """A script's command line (its main, as run_cli runs it) in this process: -> what run_script returns, for
    _one_line_error."""
    with pytest.raises(SystemExit) as e:
        train.run_cli(main, list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, e.value.code, out, err)


def test_resume_from_another_configuration_is_refused(cifar, tmp_path, capsys):
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 's2', *TINY])
    r = _cli(search.main, capsys, '--data', cifar, '--resume', save, '--space', 's3', *TINY)
    _one_line_error(r, 'another configuration', 'space')
    r = _cli(search.main, capsys, '--data', cifar, '--save', save, '--space', 's2', *TINY)
    _one_line_error(r, '--resume')
    # a checkpoint from before --key-offset, --token-before-bn, --score-bias, --detach-mixing and --edge-norm
    # existed resumes as the run it was (none of them), and only as that
    for flags in (['--grad-clip', '1'], ['--momentum', '0.5'], ['--weight-decay', '0'], ['--decode-samples', '8'],
                  ['--tau', '2']):
        r = _cli(search.main, capsys, '--data', cifar, '--resume', save, '--space', 's2', *TINY, *flags)
        _one_line_error(r, 'another configuration', flags[0][2:].replace('-', '_'))
    # a checkpoint from before a key existed is checked against the run's args.json; before --key-offset,
    # --token-before-bn, --score-bias, --detach-mixing and --edge-norm existed (and so were in no args.json
    # either), it resumes as the run it was (none of them), and only as that
    ckpt, flags_file = os.path.join(save, 'checkpoint.pt'), os.path.join(save, 'args.json')
    state = torch.load(ckpt, weights_only=False)
    for key in [*search.ADDED_KEYS, 'grad_clip']:
        del state['config'][key]
    torch.save(state, ckpt)
    with open(flags_file) as f:
        started = json.load(f)
    started['grad_clip'] = 2.0   # what the run was started with, as its args.json says
    with open(flags_file, 'w') as f:
        json.dump({k: v for k, v in started.items() if k not in search.ADDED_KEYS}, f)
    r = _cli(search.main, capsys, '--data', cifar, '--resume', save, '--space', 's2', '--no-edge-norm', *TINY,
                   '--grad-clip', '5')
    _one_line_error(r, 'another configuration', 'grad_clip=2.0')
    started['grad_clip'] = 5.0
    with open(flags_file, 'w') as f:
        json.dump({k: v for k, v in started.items() if k not in search.ADDED_KEYS}, f)
    old = ['--no-edge-norm']   # the one of them on by default today
    for flag in ('--key-offset', '--token-before-bn', '--score-bias', '--share-attention', '--detach-mixing',
                 '--edge-norm', '--aux-skip', '--token-bn', '--decorrelate', '--decorrelate-free', '--nesterov'):
        r = _cli(search.main, capsys, '--data', cifar, '--resume', save, '--space', 's2', *old, flag, *TINY)
        _one_line_error(r, 'another configuration', flag[2:].replace('-', '_'))
    search.main(['--data', cifar, '--resume', save, '--space', 's2', *old, *TINY])
    search.main(['--resume', save])   # unsaid, the flags are the run's own, and those newer than it are off
    # MIDAS's flags change nothing for darts: a darts run resumes whatever values of them it was started with
    save = str(tmp_path / 'darts')
    search.main(['--data', cifar, '--save', save, '--space', 's2', '--method', 'darts', '--attn-dim', '32', *TINY])
    with open(os.path.join(save, 'log.txt')) as f:   # and its log says so
        assert "note: --method darts searches a static table: MIDAS's flags change nothing (--attn-dim)" in f.read()
    search.main(['--data', cifar, '--resume', save, '--space', 's2', '--method', 'darts', '--patch', '8', *TINY])
    os.remove(os.path.join(save, 'args.json'))   # lost: the flags are the defaults, and the refusal says why
    r = _cli(search.main, capsys, '--resume', save)
    _one_line_error(r, 'another configuration', 'has no args.json', 'beside --resume')
    search.main(['--data', cifar, '--resume', save, '--space', 's2', '--method', 'darts', *TINY])   # given: resumed
    search.main(['--resume', save])   # and args.json is back: the flags the checkpoint accepted
    with open(os.path.join(save, 'args.json')) as f:   # older code took --nb201-table outside NB201 and both
        started = json.load(f)                         # --decorrelate flags, and ignored them: such a run still
    table = tmp_path / 'T.csv'                         # resumes (a fresh one is refused them)
    table.write_text(f'arch,c10_valid,c10_test\n{G.NB201_BEST},91.6,94.4\n')
    with open(os.path.join(save, 'args.json'), 'w') as f:
        json.dump({**started, 'nb201_table': str(table), 'decorrelate': True, 'decorrelate_free': True}, f)
    search.main(['--resume', save])


# what may change on --resume (README: another machine, another path, the choice at the end) and the commands
# that are no search at all; every other flag is the run's configuration, which a checkpoint must agree on
SEARCH_RUNTIME_FLAGS = {'data', 'save', 'download', 'device', 'amp', 'compile', 'report_freq', 'nb201_table',
                        'resume', 'redecode', 'select', 'select_samples', 'hessian_samples'}


def test_every_search_flag_is_configuration_or_runtime():
    """A flag missing from CONFIG_KEYS is neither checked on --resume nor saved in the checkpoint's config: a run
    resumed with another --tau would go on as a different search, silently. A new flag must be put in one set."""
    dests = set(vars(search.get_args([])))
    assert len(search.CONFIG_KEYS) == len(set(search.CONFIG_KEYS))
    assert not SEARCH_RUNTIME_FLAGS & set(search.CONFIG_KEYS)
    assert set(search.CONFIG_KEYS) | SEARCH_RUNTIME_FLAGS == dests, \
        sorted(dests ^ (set(search.CONFIG_KEYS) | SEARCH_RUNTIME_FLAGS))


# ---- analyze.py (issue 7) ----
import re  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402

import analyze  # noqa: E402


def _png_pixels(path):
    """Decode one of our PNGs by the spec: signature, chunk CRCs, IHDR, IDAT -> H x W x 3 uint8."""
    blob = open(path, 'rb').read()
    assert blob[:8] == b'\x89PNG\r\n\x1a\n'
    pos, chunks = 8, {}
    while pos < len(blob):
        n, kind = struct.unpack('>I', blob[pos:pos + 4])[0], blob[pos + 4:pos + 8]
        payload, crc = blob[pos + 8:pos + 8 + n], struct.unpack('>I', blob[pos + 8 + n:pos + 12 + n])[0]
        assert zlib.crc32(kind + payload) == crc, kind
        chunks[kind] = chunks.get(kind, b'') + payload
        pos += 12 + n
    assert list(chunks)[0] == b'IHDR' and list(chunks)[-1] == b'IEND'
    w, h, depth, colour, _, _, interlace = struct.unpack('>IIBBBBB', chunks[b'IHDR'])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(chunks[b'IDAT'])
    assert len(raw) == h * (1 + 3 * w)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def _dot_edges(text):
    """Check a DOT text's structure and return its edges as (from, to, label or None)."""
    bare = re.sub(r'"[^"]*"', '""', text)  # braces inside quoted names such as "c_{k-2}" do not count
    assert bare.startswith('digraph ') and bare.count('{') == 1 and bare.rstrip().endswith('}')
    assert bare.count('[') == bare.count(']')
    edges = re.findall(r'^\s*"([^"]+)" -> "([^"]+)" \[([^\]]*)\];$', text, re.M)
    assert len(edges) == text.count('->')
    return [(u, v, (re.findall(r'label="([^"]+)"', a) or [None])[0]) for u, v, a in edges]


def test_analyze_png_writer_round_trips(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    analyze.write_bytes(str(tmp_path / 'x.png'), analyze.png_bytes(img))
    assert np.array_equal(_png_pixels(str(tmp_path / 'x.png')), img)


def test_analyze_diagrams_have_every_edge(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))  # no Graphviz: DOT only
    paths = analyze.write_diagrams(G.NASNet, str(tmp_path / 'nas'), prefix='x_')  # 5 nodes, concat [4, 5, 6]
    assert [os.path.basename(p) for p in paths] == ['x_normal.dot', 'x_reduction.dot']
    analyze.main(['diagram', '--genotype', 'DARTS_V2', '--out', str(tmp_path / 'v2')])
    for g, out, prefix in ((G.DARTS_V2, 'v2', ''), (G.NASNet, 'nas', 'x_')):
        for stem, cell in (('normal', 'normal'), ('reduction', 'reduce')):
            text = (tmp_path / out / f'{prefix}{stem}.dot').read_text()
            edges = _dot_edges(text)
            names = ['c_{k-2}', 'c_{k-1}'] + [str(i) for i in range(len(getattr(g, cell)) // 2)]
            want = [(names[j], str(n // 2), op) for n, (op, j) in enumerate(getattr(g, cell))]
            want += [(names[s], 'c_{k}', None) for s in getattr(g, cell + '_concat')]
            assert sorted(edges, key=str) == sorted(want, key=str)
    analyze.main(['diagram', '--genotype', '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|'
                  'nor_conv_1x1~1|nor_conv_3x3~2|', '--out', str(tmp_path / 'nb')])
    text = (tmp_path / 'nb' / 'cell.dot').read_text()
    assert _dot_edges(text) == [
        ('c_{k-1}', '1', 'nor_conv_3x3'), ('c_{k-1}', '2', 'none'), ('1', '2', 'skip_connect'),
        ('c_{k-1}', '3', 'avg_pool_3x3'), ('1', '3', 'nor_conv_1x1'), ('2', '3', 'nor_conv_3x3'), ('3', 'c_{k}', None)]
    assert 'style=dashed' in [line for line in text.splitlines() if 'none' in line][0]
    # With a `dot` on PATH (a stand-in that echoes an SVG), the SVG and PNG land beside the DOT file.
    fake = tmp_path / 'bin'
    fake.mkdir()
    (fake / 'dot').write_text('#!/bin/sh\ncat > /dev/null\necho "<svg>$1</svg>"\n')
    (fake / 'dot').chmod(0o755)
    monkeypatch.setenv('PATH', str(fake))
    paths = analyze.write_diagrams(G.NB201_BEST, str(tmp_path / 'gv'))
    assert [os.path.basename(p) for p in paths] == ['cell.dot', 'cell.svg', 'cell.png']
    assert (tmp_path / 'gv' / 'cell.svg').read_text().strip() == '<svg>-Tsvg</svg>'


def test_analyze_statistics_match_hand_computation():
    assert analyze.bimodality([0, 0, 0, 1]) == pytest.approx(2 / 7)  # G1 = 2, G2 = 4 by hand
    n = 10  # two equal spikes: g1 = 0, g2 = -2, so b = (n-2)(n-3) / ((n-1)(n+1))
    assert analyze.bimodality([0] * 5 + [1] * 5) == pytest.approx((n - 2) * (n - 3) / ((n - 1) * (n + 1)))
    x = np.random.default_rng(0).normal(size=300)
    d = x - x.mean()
    g1, g2 = (d ** 3).mean() / (d ** 2).mean() ** 1.5, (d ** 4).mean() / (d ** 2).mean() ** 2 - 3
    skew = g1 * math.sqrt(300 * 299) / 298
    kurt = 299 / (298 * 297) * (301 * g2 + 6)
    assert analyze.bimodality(x) == pytest.approx((skew ** 2 + 1) / (kurt + 3 * 299 ** 2 / (298 * 297)))
    assert analyze.bimodality(x) < analyze.UNIMODAL < analyze.bimodality(np.r_[x - 5, x + 5])
    assert analyze.bimodality([0.2] * 50) is None and analyze.bimodality([1, 2, 3]) is None
    # classes 0 / 1 with means 2 / 6: SS_between = 24, SS_within = 4 -> F = (24 / 1) / (4 / 4), eta^2 = 24 / 28
    f, eta2 = analyze.class_separation([1, 2, 3, 5, 6, 7], [0, 0, 0, 1, 1, 1])
    assert f == pytest.approx(24.0) and eta2 == pytest.approx(6 / 7)
    assert analyze.class_separation([1, 2, 3], [4, 4, 4]) == (None, None)
    entropy, margin = analyze.sharpness([0.5, 0.25, 0.25])
    assert entropy == pytest.approx(1.5 * math.log(2) / math.log(3)) and margin == pytest.approx(0.25)
    assert analyze.sharpness([0.25] * 4) == pytest.approx((1.0, 0.0))
    assert analyze.sharpness([1.0, 0.0, 0.0]) == pytest.approx((0.0, 1.0))
    # analyse(): one edge whose weights follow the class, one static edge (a DARTS table)
    y = np.array([0, 1] * 20)
    a = np.where(y == 0, 0.7, 0.3) + np.linspace(0, 0.01, 40)
    rec = {'type': 'normal', 'edges': ['0->1', '0->2'], 'ops': [['a', 'b'], ['a', 'b']], 'grid': (2, 2),
           'w': [np.stack([a, 1 - a], 1), np.tile([[0.9, 0.1]], (40, 1))],
           'patch_entropy': [np.full(40, 0.5), np.full(40, 0.4)],
           # per image, the patches' mean centred logit and mean square: images alternate between +-1 and +-3
           'logit': [np.tile([[1., -1.], [3., -3.]], (20, 1)), np.tile([[1.1, -1.1]], (40, 1))],
           'logit_sq': [np.tile([[1., 1.], [9., 9.]], (20, 1)), np.tile([[1.21, 1.21]], (40, 1))]}
    cell = analyze.analyse([rec], y, bins=4)[0]
    moving, static = cell['edges']
    assert moving['mean'] == pytest.approx([a.mean(), 1 - a.mean()]) and moving['class_f'][0] > 1000
    assert moving['class_eta2'][0] == pytest.approx(moving['class_eta2'][1]) and moving['class_eta2'][0] > 0.99
    assert moving['bimodality'][0] > analyze.UNIMODAL and moving['unimodal'] == [False, False]
    assert sum(moving['hist'][0]['counts']) == 40 and moving['hist'][0]['counts'][1:3] == [0, 0]
    assert static['std'] == [0.0, 0.0] and static['unimodal'] == [True, True] and static['class_f'] == [None, None]
    assert static['margin'] == pytest.approx(0.8)
    assert moving['score'] == pytest.approx([2, -2]) and moving['score_std'] == pytest.approx([1, 1])  # sqrt(5 - 4)
    assert static['score'] == pytest.approx([1.1, -1.1]) and static['score_std'] == pytest.approx([0, 0], abs=1e-6)
    assert cell['margin'] == pytest.approx((abs(2 * a.mean() - 1) + 0.8) / 2)
    assert cell['patch_entropy'] == pytest.approx(0.45) and cell['unimodal_share'] == pytest.approx(0.5)


def test_analyze_midas_run_mosaic_report_compare(cifar, tmp_path, capsys):
    runs = {}
    for patch in (4, 0):
        runs[patch] = str(tmp_path / f'p{patch}')
        search.main(['--data', cifar, '--save', runs[patch], '--space', 'nb201', '--patch', str(patch), *TINY])
    out = str(tmp_path / 'mosaics')
    paths = analyze.main(['mosaic', '--run', runs[4], '--data', cifar, '--images', '3', '--cells', '0,2',
                          '--edges', '0,5', '--out', out, '--device', 'cpu'])
    assert [os.path.basename(p) for p in paths] == ['mosaic_cell0.png', 'mosaic_cell2.png']
    model, settings = analyze.load_run(runs[4], torch.device('cpu'))
    raw, x, y = analyze.load_images(settings, cifar, 'test', 40)
    records = analyze.record_weights(model, x, batch_size=16, keep_maps=3)
    for path, c in zip(paths, (0, 2)):
        img = _png_pixels(path)
        rec = records[c]
        assert img.shape == analyze.mosaic_png(raw[:3], y[:3], rec, [0, 5], 'p4').shape
        assert rec['maps'][0].shape == (3,) + ((8, 8) if c == 0 else (2, 2))
        top, x0 = 2 * (5 * analyze.SCALE + 6) + 4, analyze.LABEL_W + analyze.GAP
        panel = img[top:top + analyze.PANEL, x0:x0 + analyze.PANEL]  # the first image, 3x upsampled
        assert np.array_equal(panel, raw[0].permute(1, 2, 0).numpy().repeat(3, 0).repeat(3, 1))
        # the first map: the winning op's colour in the middle of every patch
        xm, side = x0 + analyze.PANEL + analyze.GAP, analyze.PANEL // rec['grid'][0]
        palette = [analyze.OP_COLOURS[op] for op in rec['ops'][0]]
        for (r, col), j in np.ndenumerate(rec['maps'][0][0]):
            assert tuple(img[top + r * side + side // 2, xm + col * side + side // 2]) == palette[j]
    # per-image weights agree with the decoder's averages (model.average_weights, cells of a type pooled)
    from model import average_weights
    avg = average_weights(model, [(x, y)])['normal']['weights']
    mine = np.mean([[w.mean(0) for w in r['w']] for r in records], 0)
    assert np.allclose(mine, np.array(avg), atol=1e-5)
    # the report's scores are the attention's, less their mean over the edge's ops ('none' scores 0): cell 0, 0->1
    scores = []
    hook = model.search_cells()[0].attention[0].register_forward_hook(lambda m, i, out: scores.append(out))
    edge = analyze.analyse(analyze.record_weights(model, x, batch_size=16), y.numpy())[0]['edges'][0]
    hook.remove()
    s = torch.cat(scores, 1)                                                     # 4 live ops x N x gh x gw
    s = torch.cat([torch.zeros_like(s[:1]), s]).flatten(1).double()
    centred = s - s.mean(0)
    assert edge['ops'][0] == 'none' and centred.std(1).min() > 0.01
    assert np.allclose(edge['score'], centred.mean(1).numpy(), atol=1e-4)
    assert np.allclose(edge['score_std'], centred.std(1, correction=0).numpy(), atol=1e-3)

    for patch, run in runs.items():
        analysis = analyze.main(['report', '--run', run, '--data', cifar, '--samples', '40', '--images', '2',
                                 '--device', 'cpu'])
        folder = os.path.join(run, 'analysis')
        with open(os.path.join(folder, 'analysis.json')) as f:
            assert json.load(f) == json.loads(json.dumps(analysis))
        assert analysis['samples'] == 40 and len(analysis['cells']) == 3
        assert [c['grid'] for c in analysis['cells']] == ([[8, 8], [4, 4], [2, 2]] if patch == 4 else [[1, 1]] * 3)
        for c in analysis['cells']:
            assert len(c['edges']) == 6 and 0 <= c['entropy'] <= 1 and 0 <= c['unimodal_share'] <= 1
            assert all(sum(e['mean']) == pytest.approx(1, abs=1e-5) for e in c['edges'])
        report = open(os.path.join(folder, 'report.md')).read()
        assert '## Scores: level and spread' in report
        linked = re.findall(r'\]\(([^)]+)\)', report)
        assert 'cell.dot' in linked and 'mosaic_cell0.png' in linked and '```mermaid' in report
        assert all(os.path.isfile(os.path.join(folder, name)) for name in linked)
        _png_pixels(os.path.join(folder, 'mosaic_cell1.png'))
    table = str(tmp_path / 'compare.md')
    text = analyze.main(['compare', runs[0], os.path.join(runs[4], 'analysis', 'analysis.json'), '--out', table])
    assert open(table).read() == text
    r = _cli(analyze.main, capsys, 'compare', runs[0], '--out', str(tmp_path))   # a folder: one line that names
    _one_line_error(r, f"a folder, where a file is to be written: '{tmp_path}'")   # it, not the temp file
    assert '.tmp-' not in r.stderr
    assert not [name for name in os.listdir(tmp_path) if name.startswith('.tmp-')]
    rows = [line for line in text.splitlines() if line.startswith('| p0 ') or line.startswith('| p4 ')]
    assert len(rows) == 6 * 2 and 'cell 2 (normal)' in text
    assert '| 8x8 (normal) | 4x4 (normal) | 2x2 (normal) |' in text
    # runs whose cells differ in type: no column claims one type for all of them, each grid names its own
    stats = dict(entropy=0.5, margin=0.1, patch_entropy=0.5, class_eta2=0.01, unimodal_share=1.0)
    fake = lambda name, types: {'name': name, 'settings': {'method': 'midas', 'patch': 4}, 'summary': stats,  # noqa
                                'cells': [dict(cell=i, type=t, grid=[2, 2], **stats) for i, t in enumerate(types)]}
    text = analyze.compare_markdown([fake('a', ['normal', 'normal']), fake('b', ['normal', 'reduce', 'reduce'])])
    assert '| cell 0 (normal) | cell 1 | cell 2 (reduce) |' in text and '| 2x2 (normal) | 2x2 (reduce) |' in text
    # runs that differ in their seed alone get a row of their mean ± std per statistic (not for the grid); another
    # setting, or one seed given twice, does not
    def seeded(name, seed, patch, entropy):
        s = dict(stats, entropy=entropy)
        return {'name': name, 'settings': {'method': 'midas', 'patch': patch, 'seed': seed}, 'summary': s,
                'cells': [dict(cell=0, type='normal', grid=[2, 2], **s)]}
    text = analyze.compare_markdown([seeded('s0', 0, 4, 0.5), seeded('s1', 1, 4, 0.7), seeded('q0', 0, 8, 0.9)])
    assert '| mean ± std of s0, s1 | midas | 4 | 0.6000 ± 0.1000 | 0.6000 ± 0.1000 |' in text
    assert '| mean ± std of s0, s1 | midas | 4 | 0.1000 ± 0.0000 | 0.1000 ± 0.0000 |' in text   # the margins
    assert text.count('mean ± std of') == 5 and 'q0,' not in text
    assert 'mean ± std' not in analyze.compare_markdown([seeded('s0', 0, 4, 0.5), seeded('again', 0, 4, 0.7)])
    # --token-bn's and --decorrelate's weights depend on the batch: analyses in other batches are no seeds of one
    # another; the default's are the same in any batch
    def batched(name, seed, batch, **flags):
        return {**seeded(name, seed, 4, 0.5), 'batch_size': batch} | {
            'settings': {'method': 'midas', 'patch': 4, 'seed': seed, **flags}}
    for flags, groups in (({'decorrelate': True}, 0), ({'token_bn': True}, 0), ({}, 1)):
        assert len(analyze.seed_groups([batched('a', 0, 64, **flags), batched('b', 1, 256, **flags)])) == groups
    assert analyze.get_args(['report', '--run', 'R']).batch_size == search.DECODE_BATCH   # as the decode saw them
    assert analysis['batch_size'] == search.DECODE_BATCH
    assert 'in batches' not in open(os.path.join(runs[4], 'analysis', 'report.md')).read()   # (the default's)
    assert analyze.batches(batched('a', 0, 64, token_bn=True)) == ', in batches of 64'   # report.md says it
    with open(os.path.join(runs[4], 'analysis', 'analysis.json')) as f:   # a report records the training flags
        recorded = json.load(f)['settings']                                # too: runs at another lr are no seeds
    assert (recorded['lr'], recorded['nesterov'], recorded['seed']) == (0.025, False, 0)
    assert 'mean ± std' not in analyze.compare_markdown([seeded('s0', 0, 4, 0.5), {
        **seeded('s1', 1, 4, 0.7), 'settings': {**seeded('s1', 1, 4, 0.7)['settings'], 'lr': 0.1}}])
    # darts runs that differ in MIDAS's flags and decode sizes, which change nothing for them, are seeds of one
    # setting, as nb201's rows have them
    darts = lambda name, seed, patch: {**seeded(name, seed, patch, 0.5), 'settings': {  # noqa: E731
        'method': 'darts', 'patch': patch, 'decode_samples': 16 * patch, 'select': 'weights', 'seed': seed}}
    assert '| mean ± std of d0, d1 | darts | – |' in analyze.compare_markdown([darts('d0', 0, 4), darts('d1', 1, 0)])
    # a supernet read from a search stopped short is no seed of the finished ones, and says so; another space is
    # a column of its own
    at = lambda a, epoch, space: {**a, 'epoch': epoch, 'settings': {**a['settings'], 'epochs': 3, 'space': space}}
    text = analyze.compare_markdown([at(seeded('s0', 0, 4, 0.5), 3, 'nb201'), at(seeded('s1', 1, 4, 0.7), 1, 'nb201'),
                                     at(seeded('s2', 2, 4, 0.7), 3, 'darts')])
    assert 'mean ± std' not in text and '| s1 (unfinished: epoch 1 of 3) | nb201 | midas | 4 |' in text
    older = {k: v for k, v in at(seeded('s3', 3, 4, 0.5), 3, 'nb201').items() if k != 'epoch'}   # a report of before
    assert 'mean ± std of s0, s3 |' in analyze.compare_markdown([at(seeded('s0', 0, 4, 0.5), 3, 'nb201'), older])
    assert '| s2 | darts | midas | 4 |' in text
    assert analyze.budget_name({'epochs': 1, 'init_channels': 4, 'cells': 1, 'subset': 512}).endswith(', 512 img')
    # a run older than --edge-norm (neither its args.json nor its checkpoint name it) is rebuilt as it ran
    assert model.cfg.edge_norm
    old = str(tmp_path / 'old')
    shutil.copytree(runs[4], old)
    state = torch.load(os.path.join(old, 'checkpoint.pt'), weights_only=False)
    del state['config']['edge_norm']
    torch.save(state, os.path.join(old, 'checkpoint.pt'))
    with open(os.path.join(old, 'args.json')) as f:
        args = json.load(f)
    del args['edge_norm']
    with open(os.path.join(old, 'args.json'), 'w') as f:
        json.dump(args, f)
    assert analyze.load_run(old, torch.device('cpu'))[0].cfg.edge_norm is False


def test_analyze_darts_run_and_bad_input(cifar, tmp_path):
    save = str(tmp_path / 'darts')
    search.main(['--data', cifar, '--save', save, '--space', 's3', '--method', 'darts', *TINY])
    # a DARTS-style node never keeps 'none' (METHOD.md §8): NB201's --decode-none is no rule of this run
    with open(os.path.join(save, 'genotype.json')) as f:
        assert 'decode_none' not in json.load(f)
    _one_line_error(run_script('search.py', '--redecode', save, '--decode-none', 'include'),
                    "--decode-none include is NAS-Bench-201's rule", '--space s3')
    analysis = analyze.main(['report', '--run', save, '--data', cifar, '--samples', '20', '--device', 'cpu'])
    folder = os.path.join(save, 'analysis')
    assert sorted(os.listdir(folder)) == ['analysis.json', 'normal.dot', 'reduction.dot', 'report.md']
    assert [c['type'] for c in analysis['cells']] == ['normal', 'reduce', 'reduce']
    edges = [e for c in analysis['cells'] for e in c['edges']]
    assert len(edges) == 3 * 14 and all(e['std'] == [0.0] * 3 and e['class_f'] == [None] * 3 for e in edges)
    assert analysis['summary']['unimodal_share'] == 1.0 and analysis['summary']['class_f'] is None
    # the two reduction cells share one table: the same statistics
    assert analysis['cells'][1]['edges'][0]['mean'] == analysis['cells'][2]['edges'][0]['mean']
    r = run_script('analyze.py', 'mosaic', '--run', save, '--data', cifar)
    _one_line_error(r, 'static', 'report')
    r = run_script('analyze.py', 'mosaic', '--run', str(tmp_path / 'nowhere'))
    _one_line_error(r, 'checkpoint.pt')
    with pytest.raises(analyze.RunError, match='numbered 0..2'):
        analyze.main(['report', '--run', save, '--data', cifar, '--cells', '3'])
    with pytest.raises(ValueError, match='cannot read genotype'):
        analyze.main(['diagram', '--genotype', 'nonsense'])
    with pytest.raises(analyze.RunError, match='at most 64'):
        analyze.main(['mosaic', '--run', save, '--images', '100000'])
    with pytest.raises(analyze.RunError, match='at least 4'):
        analyze.main(['report', '--run', save, '--samples', '3'])
    # a hand-edited genotype.json or dataset: one error before any file is written
    edited = tmp_path / 'edited'
    shutil.copytree(save, edited, ignore=shutil.ignore_patterns('analysis'))
    genotype = json.loads((edited / 'genotype.json').read_text())
    genotype['normal'][0][1] = 9
    (edited / 'genotype.json').write_text(json.dumps(genotype))
    with pytest.raises(ValueError, match='input 9 of node 2'):
        analyze.main(['report', '--run', str(edited), '--data', cifar, '--samples', '20', '--device', 'cpu'])
    assert not (edited / 'analysis').exists()
    state = torch.load(edited / 'checkpoint.pt', weights_only=False)
    state['config']['dataset'] = 'bogus'
    torch.save(state, edited / 'checkpoint.pt')
    with pytest.raises(analyze.RunError, match="dataset 'bogus'"):
        analyze.main(['report', '--run', str(edited), '--data', cifar])
    foreign = tmp_path / 'foreign'   # a checkpoint.pt and args.json of something else
    foreign.mkdir()
    torch.save(torch.zeros(3), foreign / 'checkpoint.pt')
    (foreign / 'args.json').write_text('[1, 2]')
    with pytest.raises(analyze.RunError, match='does not hold a search.py run'):
        analyze.main(['report', '--run', str(foreign)])
    broken = tmp_path / 'broken.json'
    broken.write_text(json.dumps({'cells': [{'grid': [1, 1]}], 'settings': {}}))
    with pytest.raises(analyze.RunError, match="broken.json' holds no analysis.json"):   # the bad one of several
        analyze.main(['compare', save, str(broken)])


# ---- train.py (issue 3) ----
import train  # noqa: E402
from model import count_parameters  # noqa: E402

TRAIN_TINY = ['--batch-size', '16', '--init-channels', '4', '--subset', '64', '--report-freq', '2', '--device', 'cpu',
              '--no-download']
NB201_ALL_SKIP = '|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|'
# A genotype that kept RDARTS S4's 'noise': its random numbers must be part of what a resumed run restores.
NOISY = ("Genotype(normal=[('noise', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('noise', 2), ('noise', 1), "
         "('sep_conv_3x3', 3), ('sep_conv_3x3', 0), ('noise', 4)], normal_concat=range(2, 6), reduce=[('noise', 0), "
         "('sep_conv_3x3', 1), ('noise', 2), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('noise', 3), "
         "('sep_conv_3x3', 2), ('noise', 4)], reduce_concat=range(2, 6))")
# (without, with the auxiliary head), measured with the original DARTS code at its sizes
DARTS_COUNTS = {
    ('DARTS_V1', 'cifar10'): (3169414, 3645840), ('DARTS_V1', 'cifar100'): (3221344, 3766980),
    ('DARTS_V1', 'imagenet'): (4510432, 5771208), ('DARTS_V2', 'cifar10'): (3349342, 3825768),
    ('DARTS_V2', 'cifar100'): (3401272, 3946908), ('DARTS_V2', 'imagenet'): (4718752, 5979528),
}
# C16 N5 for 10 / 100 / 120 classes, measured with the NAS-Bench-201 code
NB201_COUNTS = {G.NB201_PAPER: (1288506, 1294356, 1295656), NB201_ALL_SKIP: (73306, 79156, 80456)}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_parameter_counts_match_the_original_code():
    for (name, dataset), counts in DARTS_COUNTS.items():
        args = train.get_args(['--genotype', name, '--dataset', dataset])
        genotype, _ = train.resolve_args(args)  # the protocol's sizes: 36 channels / 20 cells, 48 / 14
        net = train.build_model(genotype, dataset, args.init_channels, args.layers, args.cells,
                                args.auxiliary_weight > 0)
        assert (count_parameters(net), count_parameters(net, exclude_auxiliary=False)) == counts, (name, dataset)
    for arch, counts in NB201_COUNTS.items():
        for dataset, count in zip(['cifar10', 'cifar100', 'imagenet16-120'], counts):
            args = train.get_args(['--genotype', arch, '--dataset', dataset])
            train.resolve_args(args)  # NB201's C=16, N=5, no auxiliary head
            net = train.build_model(arch, dataset, args.init_channels, args.layers, args.cells)
            assert count_parameters(net, exclude_auxiliary=False) == count, (arch, dataset)


def test_eval_networks_nb201_blocks_and_darts_auxiliary_head():
    """What parameter counts cannot see. NAS-Bench-201's InferCell: node k sums op_jk(node j) over j < k, edges in
    arch-string order (node 3 <- node 0 by skip, all else 'none': the cell is the identity). Its stride-2 residual
    block adds the 2x2-average-pooled, 1x1-convolved input to conv_b(conv_a(x)). NetworkCIFAR's auxiliary head
    reads the output of the cell at 2/3 of the depth (the second reduction: 8x8 maps), in training only."""
    from model import InferCell, NetworkCIFAR, ResNetBasicblock
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    cell = InferCell('|nor_conv_1x1~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|', 4)
    assert torch.equal(cell(x), x)
    block = ResNetBasicblock(4, 8, 2)
    with torch.no_grad():   # conv_b's BN gives 0: what is left is the residual branch
        block.conv_b[2].weight.zero_()
        block.conv_b[2].bias.zero_()
    torch.testing.assert_close(block(x), F.conv2d(F.avg_pool2d(x, 2), block.downsample[1].weight))
    same = ResNetBasicblock(4, 4, 1)   # stride 1, same width: the identity is the residual branch
    with torch.no_grad():
        same.conv_b[2].weight.zero_()
        same.conv_b[2].bias.zero_()
    assert torch.equal(same(x), x)

    net = NetworkCIFAR(4, 10, 6, True, G.DARTS_V2)   # reductions at cells 2 and 4
    seen = {}
    net.cells[4].register_forward_hook(lambda m, i, out: seen.__setitem__('cell', out))
    net.auxiliary_head.register_forward_hook(lambda m, i, out: seen.__setitem__('head', i[0]))
    _, aux = net(torch.randn(2, 3, 32, 32))
    assert aux.shape == (2, 10) and seen['head'] is seen['cell'] and seen['head'].shape[-2:] == (8, 8)
    assert net.eval()(torch.randn(2, 3, 32, 32))[1] is None


def test_train_defaults_are_the_darts_protocols():
    args = train.get_args(['--genotype', 'DARTS_V2'])
    train.resolve_args(args)
    assert (args.epochs, args.batch_size, args.lr, args.schedule, args.momentum, args.weight_decay, args.cutout,
            args.drop_path, args.auxiliary_weight, args.grad_clip, args.init_channels, args.layers) == \
        (600, 96, 0.025, 'cosine', 0.9, 3e-4, 16, 0.2, 0.4, 5.0, 36, 20)
    args = train.get_args(['--genotype', 'DARTS_V2', '--dataset', 'imagenet'])
    train.resolve_args(args)
    assert (args.epochs, args.batch_size, args.lr, args.schedule, args.lr_gamma, args.label_smoothing,
            args.weight_decay, args.auxiliary_weight, args.grad_clip, args.drop_path, args.init_channels,
            args.layers) == (250, 128, 0.1, 'step', 0.97, 0.1, 3e-5, 0.4, 5.0, 0.0, 48, 14)
    assert train.get_args(['--arch', 'DARTS_V2']).genotype == 'DARTS_V2'   # DARTS's own train.py flag


def test_readme_table_of_the_training_protocols_is_train_protocols():
    """The README's table of train.py's protocols: every value of train.PROTOCOLS, '–' where a protocol has none."""
    with open(os.path.join(HERE, 'README.md')) as f:
        text = f.read()
    head = '| flag | DARTS (`cifar`) | DARTS mobile (`imagenet`) | NAS-Bench-201 (`nb201`) |'
    rows = text[text.index(head):].split('\n\n')[0].splitlines()[2:]
    protocols = [train.PROTOCOLS[name] for name in re.findall(r'\(`(\w+)`\)', head)]
    flags = {option for action in train.build_parser()._actions for option in action.option_strings}
    for row in rows:
        flag, *cells = [c.strip().strip('`') for c in row.split('|')[1:-1]]
        key = flag[2:].replace('-', '_')
        assert flag in flags
        assert cells == [str(p[key]) if key in p else '–' for p in protocols], flag
    assert sorted(row.split('`')[1][2:].replace('-', '_') for row in rows) == sorted({k for p in protocols for k in p})


def test_train_step_loss_is_smoothed_cross_entropy_plus_weighted_aux_and_the_gradient_is_clipped():
    """DARTS's retraining step (METHOD.md §10): the loss is the label-smoothed cross-entropy of the logits plus
    --auxiliary-weight times that of the auxiliary head (smoothed alike), and the step takes the gradient clipped
    to --grad-clip. Each is silent when wrong: the run still trains, to a worse network than the protocol's."""
    torch.manual_seed(0)
    net, head = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
    params = [*net.parameters(), *head.parameters()]
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    with torch.no_grad():
        expected = (F.cross_entropy(net(x), y, label_smoothing=0.1)
                    + 0.4 * F.cross_entropy(head(x), y, label_smoothing=0.1)).item()
    args = argparse.Namespace(label_smoothing=0.1, auxiliary_weight=0.4, grad_clip=0.01, report_freq=1, epochs=1)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, 1.0)
    _, autocast, scaler = train.amp_setup('off', torch.device('cpu'))
    loss, _ = train.train_epoch(lambda inp: (net(inp), head(inp)), params, [(x, y)], 1, opt, scaler, autocast, args,
                                1, 0, 1.0, train.Throughput(1), lambda msg: None)
    assert loss == pytest.approx(expected, rel=1e-6)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).norm().item()
    assert moved == pytest.approx(0.01, rel=1e-4)   # lr 1 times the gradient clipped to norm 0.01


def test_train_lr_schedule_and_drop_path_ramp_per_epoch(cifar, tmp_path):
    """Per epoch, as DARTS: the lr is cosine-annealed from --lr to 0 over the run (stepped once an epoch, not per
    step) and drop path ramps linearly from 0, drop_path * epoch / epochs (epoch from 0): the first epoch trains
    without it. history.json records both."""
    save = str(tmp_path / 'run')
    train.main(['--genotype', 'DARTS_V2', '--data', cifar, '--save', save, *TRAIN_TINY, '--layers', '3',
                '--subset', '32', '--epochs', '3', '--eval-freq', '3'])
    with open(os.path.join(save, 'history.json')) as f:
        history = json.load(f)
    assert [h['lr'] for h in history] == pytest.approx([0.025 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    assert [h['drop_path'] for h in history] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3])


def test_train_torchrun_two_ranks_end_with_identical_weights(cifar, tmp_path, capsys, one_thread):
    save = str(tmp_path / 'ddp')
    r = run_script('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                   '--genotype', 'DARTS_V2', '--data', cifar, '--save', save, *TRAIN_TINY, '--layers', '3',
                   '--epochs', '2', env={'MIDAS_RANK_STATES': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(os.path.join(save, f'rank{k}-state.pt'), weights_only=True) for k in (0, 1))
    ckpt = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    assert _same_weights(a, b) and _same_weights(a, ckpt['model'])   # parameters and BN statistics
    torch.manual_seed(0)
    init = train.build_model(G.DARTS_V2, 'cifar10', 4, 3, auxiliary=True).state_dict()
    assert not torch.equal(a['classifier.weight'], init['classifier.weight'])  # they did train
    assert len(ckpt['rng']) == 2 and not torch.equal(ckpt['rng'][0]['cpu'], ckpt['rng'][1]['cpu'])
    with open(os.path.join(save, 'report.json')) as f:
        report = json.load(f)
    assert report['world_size'] == 2 and ' x 2,' in open(os.path.join(save, 'log.txt')).read()
    # the test set split over the ranks and summed gives what one process measures on all of it
    alone = train.main(['--eval', save, '--data', cifar, '--subset', '64', '--device', 'cpu'])
    assert alone['test_images'] == 50 and alone['test_top1'] == report['test_top1']
    assert alone['test_loss'] == pytest.approx(report['test_loss'], rel=1e-5)
    assert f"test top-1 {report['test_top1']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize('space', ['darts', 'nb201'])
def test_train_search_genotype_trains_unedited(cifar, tmp_path, space, one_thread):
    run = str(tmp_path / 'search')
    search.main(['--data', cifar, '--save', run, '--space', space, *TINY])
    save = str(tmp_path / 'train')
    depth = ['--cells', '1'] if space == 'nb201' else ['--layers', '3']
    report = train.main(['--genotype', os.path.join(run, 'genotype.json'), '--data', cifar, '--save', save,
                         *TRAIN_TINY, *depth, '--epochs', '1'])
    assert report['network'] == ('NB201Network' if space == 'nb201' else 'NetworkCIFAR')
    assert report['epochs'] == 1 and 0 <= report['test_top1'] <= report['test_top5'] <= 100
    with open(os.path.join(save, 'report.json')) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(os.path.join(run, 'genotype.json')) as f1, open(os.path.join(save, 'genotype.json')) as f2:
        assert G.genotype_from_json(json.load(f1)) == G.genotype_from_json(json.load(f2))
    for name in ('log.txt', 'args.json', 'history.json', 'checkpoint.pt'):
        assert os.path.isfile(os.path.join(save, name)), name


def test_train_resume_after_sigkill_equals_uninterrupted_run(cifar, tmp_path, capsys, one_thread):
    args = ['train.py', '--genotype', NOISY, '--data', cifar, *TRAIN_TINY, '--layers', '3', '--epochs', '3']
    full = str(tmp_path / 'full')
    r = run_script(*args, '--save', full)
    assert r.returncode == 0, r.stderr

    killed = str(tmp_path / 'killed')
    ckpt = kill_after_first_checkpoint(args, killed)
    assert torch.load(ckpt, weights_only=False)['epoch'] < 3
    assert not os.path.exists(os.path.join(killed, 'report.json'))
    fp16 = str(tmp_path / 'fp16')   # a run saved without fp16 (an empty scaler state) goes on with it
    shutil.copytree(killed, fp16)
    assert train.main(['--resume', fp16, '--amp', 'fp16'])['amp'] == 'fp16'
    lost = str(tmp_path / 'lost')   # its args.json lost: the defaults are refused, with where the flags went;
    shutil.copytree(killed, lost)   # given beside --resume, they are checked, the run goes on and args.json is back
    os.remove(os.path.join(lost, 'args.json'))
    _one_line_error(_cli(train.main, capsys, '--resume', lost), 'another configuration', 'has no args.json')
    train.main(['--resume', lost, *args[1:]])
    assert train.started_with(lost)['epochs'] == 3

    r = run_script('train.py', '--resume', killed)  # the run's own flags, data and genotype
    assert r.returncode == 0, r.stderr
    reports = []
    for save in (full, killed):
        with open(os.path.join(save, 'report.json')) as f:
            reports.append(json.load(f))
        with open(os.path.join(save, 'history.json')) as f:
            reports[-1]['history'] = [{k: v for k, v in h.items() if k != 'time_s'} for h in json.load(f)]
        reports[-1].pop('wall_time_s')
    assert reports[0] == reports[1]
    a, b = (torch.load(os.path.join(s, 'checkpoint.pt'), weights_only=False)['model'] for s in (full, killed))
    assert _same_weights(a, b)
    result = train.main(['--eval', os.path.join(killed, 'checkpoint.pt'), '--data', cifar, '--subset', '64'])
    assert result['test_top1'] == reports[1]['test_top1'] and result['test_images'] == 50
    r = _cli(train.main, capsys, '--resume', killed, '--lr', '0.1')
    _one_line_error(r, 'another configuration', 'lr')
    _one_line_error(_cli(train.main, capsys, '--eval', killed, '--subset', '-5'), '--subset must be')
    _one_line_error(_cli(train.main, capsys, '--eval', killed, '--layers', '5'), 'leave out the network flags')
    _one_line_error(_cli(train.main, capsys, '--resume', killed, '--save', full), 'continues in its own folder')
    # killed in its first epoch (args.json and genotype.json written, no checkpoint yet): --resume trains it again
    early = tmp_path / 'early'
    early.mkdir()   # killed before its args.json: nothing to resume, and the way to start it again
    _one_line_error(_cli(train.main, capsys, '--resume', str(early)), 'no readable args.json',
                    f'give its command again with --save {early}')
    for name in ('args.json', 'genotype.json'):
        shutil.copy(os.path.join(full, name), early / name)
    for flags, word in ((['--lr', '0.1'], 'lr'), (['--genotype', 'DARTS_V2'], 'genotype')):   # as the run it was
        _one_line_error(_cli(train.main, capsys, '--resume', str(early), *flags), 'another configuration', word)
    assert not (early / 'log.txt').exists()
    r = run_script('train.py', '--resume', str(early))
    assert r.returncode == 0, r.stderr
    with open(early / 'report.json') as f:
        again = json.load(f)
    again.pop('wall_time_s')
    assert again == {k: v for k, v in reports[0].items() if k != 'history'}
    assert 'training again from the start' in (early / 'log.txt').read_text()
    with open(early / 'args.json') as f:   # its record keeps the cell as the run was given it, not a path of its own
        assert json.load(f)['genotype'] == NOISY
    # killed between its args.json and its genotype.json (a run of older code: the two are now written the other
    # way round): the user is told the cell to name
    older = tmp_path / 'older'
    older.mkdir()
    shutil.copy(os.path.join(full, 'args.json'), older / 'args.json')
    _one_line_error(_cli(train.main, capsys, '--resume', str(older)), 'has no genotype.json', f'--genotype {NOISY}')


def test_ddp_is_told_when_a_genotype_leaves_parameters_without_gradient():
    """DDP waits for every parameter's gradient and fails at the second step if one never comes: 'noise' ignores its
    input, so a state only noise reads (and not concatenated) leaves its preprocessing or operations unused."""
    only_noise_reads_0 = G.Genotype([('noise', 0), ('sep_conv_3x3', 1)] * 4, [2, 3, 4, 5],
                                    [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4, [2, 3, 4, 5])
    node_2_unread = G.Genotype([('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 2 + [('skip_connect', 0),
                               ('noise', 2)] * 2, [3, 4, 5], G.DARTS_V2.reduce, G.DARTS_V2.reduce_concat)
    from model import NetworkCIFAR
    cases = [G.DARTS_V2, G.load_genotype(NOISY)[0], only_noise_reads_0, node_2_unread]
    torch.manual_seed(0)
    for genotype in cases:
        net = NetworkCIFAR(4, 10, 3, False, genotype)
        F.cross_entropy(net(torch.randn(2, 3, 32, 32))[0], torch.tensor([0, 1])).backward()
        unused = any(p.grad is None for p in net.parameters())
        assert train.leaves_parameters_unused(genotype) == unused
    assert [train.leaves_parameters_unused(g) for g in cases] == [False, False, True, True]
    assert not train.leaves_parameters_unused(G.NB201_BEST)


def test_train_resume_keeps_the_runs_own_runtime_flags_and_cutout_scales_with_the_image(tmp_path):
    """--resume: precision, test and log frequencies are the run's unless given again (they went back to the
    defaults: a bf16 run went on in float32). Cutout's default is DARTS's 16 of 32 pixels, scaled to the images."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', 'amp': 'bf16', 'eval_freq': 3, 'report_freq': 7}))
    (run / 'genotype.json').write_text(json.dumps(G.genotype_to_json(G.DARTS_V2, 'darts')))
    args = train.get_args(['--resume', str(run)])
    train.resolve_args(args)
    assert (args.amp, args.eval_freq, args.report_freq, args.compile, args.cutout) == ('bf16', 3, 7, False, 16)
    args = train.get_args(['--resume', str(run), '--amp', 'off'])
    train.resolve_args(args)
    assert args.amp == 'off'
    args = train.get_args(['--genotype', 'DARTS_V2', '--dataset', 'imagenet16-120'])   # no CIFAR head on 16x16
    train.resolve_args(args)
    assert (args.cutout, args.auxiliary_weight) == (8, 0.0)


@pytest.mark.parametrize('script', ['search', 'train'])
def test_resume_refuses_a_hand_edited_args_json_in_one_line(tmp_path, script):
    """A value its flag cannot take (a string for an int, a float for an int, a bool for a float, an unknown
    choice) is named with its file, not met later as a TypeError in the middle of the run."""
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'genotype.json').write_text(json.dumps(G.genotype_to_json(G.DARTS_V2, 'darts')))
    resume = lambda: (train.resolve_args(train.get_args(['--resume', str(run)])) if script == 'train'
                      else search.get_args(['--resume', str(run)]))
    own = {'method': 'midas'} if script == 'search' else {}   # only a search's args.json holds 'method'
    for flags in ({'epochs': 'ten'}, {'epochs': 2.5}, {'lr': True}, {'amp': 'fp8'},
                  *([{'seed': None}] if script == 'search' else []),   # train's unset flags are None
                  {'nesterov' if script == 'train' else 'unrolled': 'yes'}):
        (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', **own, **flags}))
        with pytest.raises(train.RunError, match=f"args.json: {next(iter(flags))} = "):
            resume()
    for text in (b'\x82\xff', b'[1, 2]'):   # not JSON of flags: said so, not read as a run without flags
        (run / 'args.json').write_bytes(text)
        with pytest.raises(train.RunError, match='args.json.* (is unreadable|holds no flags)'):
            resume()
    # the other script's run folder, by name (train's unset flags would not fit search's parser, and the reverse)
    (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', 'cells': None, **({} if own else
                                                                                         {'method': 'midas'})}))
    with pytest.raises(train.RunError, match='is not a search.py run' if own else 'is a search.py run: retrain'):
        resume()
    (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', **own, 'epochs': 3, 'lr': 1, 'amp': 'off'}))
    args = resume() if script == 'search' else train.get_args(['--resume', str(run)])
    if script == 'train':
        train.resolve_args(args)
    assert (args.epochs, args.lr, args.amp) == (3, 1, 'off')
    # --compile can be turned off for the rest of a run that was compiled (a machine where compiling fails)
    (run / 'args.json').write_text(json.dumps({'dataset': 'cifar10', **own, 'compile': True}))
    for given, compiled in (([], True), (['--no-compile'], False)):
        argv = ['--resume', str(run), *given]
        args = search.get_args(argv) if script == 'search' else train.get_args(argv)
        if script == 'train':
            train.resolve_args(args)
        assert args.compile is compiled


S2_WITH_5X5 = G.genotype_to_json(G.Genotype([('sep_conv_5x5', 0), ('skip_connect', 1)] * 4, [2, 3, 4, 5],
                                            [('sep_conv_3x3', 0), ('skip_connect', 1)] * 4, [2, 3, 4, 5]), 's2')


@pytest.mark.parametrize('flags, words', [
    (['--genotype', "Genotype(normal=[('sep_conv_3x3', 0)"], ['malformed genotype literal']),
    (['--genotype', "Genotype(normal=[('conv_9x9', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])"],
     ["unknown op 'conv_9x9'"]),
    (['--genotype', 'S2_JSON'], ["op 'sep_conv_5x5' is not a candidate", "space 's2'"]),
    (['--genotype', '|nor_conv_3x3~0|+|conv_9x9~0|none~1|+|none~0|none~1|none~2|'],
     ["unknown NAS-Bench-201 op 'conv_9x9'"]),
    (['--genotype', '|nor_conv_3x3~0|+|none~0|'], ['malformed NAS-Bench-201 arch string']),
    (['--genotype', 'DARTS_V9'], ["cannot read genotype 'DARTS_V9'"]),
    ([], ['--genotype is required']),
    (['--genotype', NB201_ALL_SKIP, '--auxiliary-weight', '0.4'], ['--auxiliary-weight does not apply']),
    (['--genotype', 'DARTS_V2', '--dataset', 'imagenet16-120', '--auxiliary-weight', '0.4'],
     ['auxiliary head needs 32x32']),
    (['--genotype', 'DARTS_V2', '--layers', '2'], ['--layers must be at least 3']),
    (['--resume', 'NOWHERE'], ['no train.py run to resume']),
    (['--eval', 'NOWHERE'], ['no checkpoint']),
    (['--genotype', "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[0])"], ['must name nodes 2..2']),
    (['--genotype', "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=range(10**12))"],
     ['malformed genotype literal']),
    (['--genotype', '|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2||'], ['malformed NAS-Bench-201']),
    (['--genotype', 'ARCH_123'], ['expected a string']),
    (['--genotype', "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2, 2], "
                    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=[2])"], ['each once']),
    (['--genotype', "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
                    "reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)], reduce_concat=range(99999999999999999999))"],
     ['malformed genotype literal']),
    (['--genotype', 'DARTS_V2', '--momentum', 'nan'], ['--momentum must be in [0, 1)']),
    (['--genotype', 'DARTS_V2', '--lr', 'inf'], ['--lr must be positive and finite']),
    (['--genotype', 'DARTS_V2', '--cutout', '40'], ['--cutout 40 is larger than the 32x32 images']),
    (['--genotype', 'DARTS_V2', '--layers', '3', '--epochs', '1', '--subset', '100000'],
     ['--subset 100000:', 'training images']),
    (['--genotype', 'BYTES'], ['cannot read genotype file', 'bytes.json']),
    (['--genotype', 'DARTS_V2', '--batch-size', '1'], ['one image', 'auxiliary head needs two']),
    (['--eval', 'PARTIAL'], ['is not a train.py checkpoint']),   # its network's sizes are missing
    (['--eval', 'PARTIAL', '--genotype', 'DARTS_V1'], ['leave out --genotype']),   # not silently another cell
    (['--eval', 'PARTIAL', '--lr', '0.1', '--no-nesterov'], ['leave out --lr, --nesterov']),  # not silently ignored
])
def test_train_bad_input_is_one_line(cifar, tmp_path, capsys, flags, words):
    s2 = tmp_path / 'genotype.json'
    s2.write_text(json.dumps(S2_WITH_5X5))
    arch = tmp_path / 'arch.json'
    arch.write_text(json.dumps({'arch': 123}))
    (tmp_path / 'bytes.json').write_bytes(bytes([0x82, 0xff, 0x00, 0x10]))   # not UTF-8
    torch.save({'config': {'genotype': G.genotype_to_json(G.DARTS_V2, 'darts'), 'dataset': 'cifar10'}, 'model': {}},
               tmp_path / 'partial.pt')
    flags = [{'S2_JSON': str(s2), 'NOWHERE': str(tmp_path / 'nowhere'), 'ARCH_123': str(arch),
              'BYTES': str(tmp_path / 'bytes.json'), 'PARTIAL': str(tmp_path / 'partial.pt')}.get(f, f)
             for f in flags]
    save = tmp_path / 'run'
    _one_line_error(_cli(train.main, capsys, '--data', cifar, '--save', str(save), *TRAIN_TINY, *flags), *words)
    assert not save.exists()


def test_train_bad_input_from_the_command_line(cifar, tmp_path):
    s2 = tmp_path / 'genotype.json'
    s2.write_text(json.dumps(S2_WITH_5X5))
    r = run_script('train.py', '--genotype', str(s2), '--data', cifar, '--save', str(tmp_path / 'r'), *TRAIN_TINY)
    _one_line_error(r, "op 'sep_conv_5x5' is not a candidate")
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent or broken: ImageNet must say so in one line
        r = run_script('train.py', '--genotype', 'DARTS_V2', '--dataset', 'imagenet', '--data', str(tmp_path),
                       '--save', str(tmp_path / 'r'))
        _one_line_error(r, 'torchvision')
    assert not os.path.exists(tmp_path / 'r')


def test_train_imagenet_protocol_with_a_stand_in_loader(tmp_path, monkeypatch, one_thread):
    made = []

    def loader(root, is_train, batch_size, workers, distributed=False, seed=0):  # imagenet_loader, no torchvision
        made.append((is_train, batch_size, distributed) + ((seed,) if is_train else ()))
        g = torch.Generator().manual_seed(int(is_train))
        n = 4 if is_train else 3
        ds = torch.utils.data.TensorDataset(torch.randn(n, 3, 224, 224, generator=g),
                                            torch.randint(0, 1000, (n,), generator=g))
        return data.epoch_loader(ds, batch_size, workers, is_train, distributed, seed)

    monkeypatch.setattr(train, 'imagenet_loader', loader)
    save = str(tmp_path / 'run')
    report = train.main(['--genotype', 'DARTS_V2', '--dataset', 'imagenet', '--data', str(tmp_path), '--save', save,
                         '--epochs', '2', '--batch-size', '2', '--init-channels', '4', '--layers', '3',
                         '--device', 'cpu', '--seed', '3', '--workers', '2'])   # the default 8: more than 2 cores
    assert made == [(True, 2, False, 3), (False, 2, False)] and report['network'] == 'NetworkImageNet'
    with open(os.path.join(save, 'history.json')) as f:
        history = json.load(f)
    assert [h['lr'] for h in history] == pytest.approx([0.1, 0.097])  # step decay 0.97 per epoch
    assert [h['test_images'] for h in history] == [3, 3]
    ckpt = os.path.join(save, 'checkpoint.pt')
    with pytest.raises(train.RunError, match='--subset applies to the in-memory datasets'):   # it was ignored
        train.main(['--eval', ckpt, '--subset', '2'])
    made.clear()
    workers = []
    monkeypatch.setattr(train, 'imagenet_loader', lambda root, is_train, b, w, *a: workers.append(w) or loader(
        root, is_train, b, w, *a))
    assert train.main(['--eval', ckpt])['test_images'] == 3
    assert workers == [2]   # --eval takes the run's own workers, not the default 8

    # DistributedSampler pads a rank's part of the test set with repeats: only the first `limit` count
    net = torch.nn.Linear(4, 7)
    forward = lambda x: (net(x), None)  # noqa: E731
    x, y = torch.randn(10, 4), torch.randint(0, 7, (10,))
    _, autocast, _ = train.amp_setup('off', torch.device('cpu'))
    whole = train.evaluate(forward, net, [(x[:6], y[:6]), (x[6:], y[6:])], autocast, torch.device('cpu'), 1)
    padded = [(x[:6], y[:6]), (torch.cat([x[6:], x[:3]]), torch.cat([y[6:], y[:3]])), (x[:4], y[:4])]
    assert train.evaluate(forward, net, padded, autocast, torch.device('cpu'), 1, limit=10) == whole


def _torchvision_or_skip():
    try:   # a broken install fails with other errors than ImportError, which importorskip lets through
        return data._torchvision()
    except data.DataError as e:
        pytest.skip(str(e))


def _svhn_files(root, monkeypatch, n=(40, 20)):
    """SVHN's official .mat layout (X: 32 x 32 x 3 x N uint8, y: N x 1 in 1..10, 10 for the digit 0), with
    torchvision's md5s set to these files' (it checks them even with download=False)."""
    tv = _torchvision_or_skip()
    sio = pytest.importorskip('scipy.io')
    rng = np.random.default_rng(0)
    for split, k in zip(('train', 'test'), n):
        url, name, _ = tv.datasets.SVHN.split_list[split]
        X, y = rng.integers(0, 256, (32, 32, 3, k), dtype=np.uint8), np.arange(k) % 10 + 1
        sio.savemat(os.path.join(root, name), {'X': X, 'y': y.reshape(k, 1)})
        with open(os.path.join(root, name), 'rb') as f:
            md5 = hashlib.md5(f.read()).hexdigest()
        monkeypatch.setitem(tv.datasets.SVHN.split_list, split, [url, name, md5])
        yield X, y


def test_svhn_reads_torchvisions_files_as_nchw_with_digit_0_as_label_0(tmp_path, monkeypatch):
    for train, (X, y) in zip((True, False), list(_svhn_files(str(tmp_path), monkeypatch))):
        x, labels = data.load_dataset('svhn', str(tmp_path), train=train, download=False)
        assert x.dtype == torch.uint8 and x.is_contiguous()
        assert np.array_equal(x.numpy(), X.transpose(3, 2, 0, 1))    # image n, channel c, row, column
        assert labels.tolist() == [v % 10 for v in y]
    (tmp_path / 'test_32x32.mat').write_bytes(b'truncated')
    with pytest.raises(data.DataError, match='not the official file'):
        data.load_dataset('svhn', str(tmp_path), train=False, download=False)
    with pytest.raises(data.DataError, match='not found'):
        data.load_dataset('svhn', str(tmp_path / 'nowhere'), train=True, download=False)


def _imagenet_tree(root, classes, per_class=2):
    Image = pytest.importorskip('PIL.Image')
    for split, names in classes.items():
        for i, name in enumerate(names):
            os.makedirs(os.path.join(root, split, name))
            for j in range(per_class):
                Image.fromarray(np.full((40, 48, 3), 40 * i + j, np.uint8)).save(
                    os.path.join(root, split, name, f'{j}.JPEG'))


def test_imagenet_loader_reads_class_folders_and_refuses_splits_that_disagree(tmp_path):
    _torchvision_or_skip()
    _imagenet_tree(str(tmp_path / 'ok'), {'train': ['a', 'b', 'c'], 'val': ['a', 'b', 'c']})
    q = data.imagenet_loader(str(tmp_path / 'ok'), False, 6, 0)
    x, y = next(iter(q))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 1, 1, 2, 2]
    _imagenet_tree(str(tmp_path / 'bad'), {'train': ['a', 'b', 'c'], 'val': ['b', 'c']})   # val's 'b' would be 0
    for train in (True, False):
        with pytest.raises(data.DataError, match='different class folders'):
            data.imagenet_loader(str(tmp_path / 'bad'), train, 2, 0)


class _Jitter(torch.utils.data.Dataset):
    """Images with a random shift drawn from torch's generator in __getitem__, as torchvision's transforms draw."""
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(())


def test_epoch_loader_resumes_with_the_same_order_and_augmentation():
    """ImageNet's loader: an epoch begun by set_loader_epoch reads the same images in the same order with the same
    augmentation whatever came before it, with worker processes (which, kept from epoch to epoch, carried their
    random state over) and in the main process alike: a resumed run reads what an uninterrupted one read."""
    for workers in (2, 0):
        def epochs(loader, which):
            out = []
            for e in which:
                data.set_loader_epoch(loader, e)
                out.append(torch.cat([x for x in loader]))
            return out

        torch.manual_seed(0)
        whole = epochs(data.epoch_loader(_Jitter(), 4, workers, True, seed=5), range(3))
        torch.manual_seed(0)
        resumed = data.epoch_loader(_Jitter(), 4, workers, True, seed=5)
        epochs(resumed, [0])
        rng = torch.get_rng_state()   # what the checkpoint of epoch 1 holds, restored in a fresh loader
        fresh = data.epoch_loader(_Jitter(), 4, workers, True, seed=5)
        torch.manual_seed(123)
        torch.set_rng_state(rng)
        again = epochs(fresh, [1, 2])
        assert all(torch.equal(a, b) for a, b in zip(whole[1:], again))
        assert sorted(whole[1].floor().tolist()) == list(range(12))   # each image once
        assert not torch.equal(whole[1].floor(), whole[2].floor())     # a new order each epoch
        assert not torch.allclose(whole[1].sort().values, whole[2].sort().values)   # and new augmentation
        other = epochs(data.epoch_loader(_Jitter(), 4, workers, True, seed=6), [1])
        assert not torch.equal(other[0], whole[1])


def test_train_evaluation_counts_top1_and_top5():
    """Top-5 counts a label among the five largest logits (top-1 the largest alone); with fewer than five
    classes every label is in the top five."""
    labels = torch.tensor([0, 1, 4, 5])   # logits -arange(7): class k is ranked k-th
    logits = -torch.arange(7.).expand(4, 7)
    forward, model = (lambda x: (x, None)), torch.nn.Identity()
    _, autocast, _ = train.amp_setup('off', torch.device('cpu'))
    result = train.evaluate(forward, model, [(logits[:3], labels[:3]), (logits[3:], labels[3:])], autocast,
                            torch.device('cpu'), 1)
    assert (result['test_top1'], result['test_top5'], result['test_images']) == (25.0, 75.0, 4)
    assert result['test_loss'] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    few = train.evaluate(forward, model, [(logits[:, :3], torch.tensor([2, 1, 0, 2]))], autocast,
                         torch.device('cpu'), 1)
    assert (few['test_top1'], few['test_top5']) == (25.0, 100.0)


def test_train_imagenet_test_limit_counts_each_ranks_real_images(monkeypatch):
    """Under torchrun each rank tests every world-th ImageNet image, DistributedSampler padding the last round with
    repeats: a rank's real images are len(range(rank, n, world)), which sum to n over the ranks. A plain n // world
    drops images (5 over 2 ranks: 2 + 2) or, rounded up, counts the repeats."""
    monkeypatch.setattr(train, 'imagenet_loader', lambda root, is_train, batch, workers, distributed=False, seed=0:
                        argparse.Namespace(dataset=list(range(5))))
    args = argparse.Namespace(dataset='imagenet', batch_size=4, workers=0, data='.', seed=0)
    limits = [train.make_queues(args, torch.device('cpu'), rank, 2)[2] for rank in (0, 1)]
    assert limits == [3, 2]
    assert [train.make_queues(args, torch.device('cpu'), rank, 3)[2] for rank in range(3)] == [2, 2, 1]


# ---- the sources' other methods: --mim and --mean-shift (issue 6) ----

def _ms_args(**kw):
    return argparse.Namespace(**{'ms_iters': 2, 'ms_samples': 3, 'ms_eps': 0.25, 'ms_bandwidth': 1.0,
                                 'ms_reference': True, **kw})


def _step_setup(method, space='nb201'):
    torch.manual_seed(0)
    model = SearchNetwork(space, C=4, layers=3, cells=1, cfg=ArchConfig(method=method))
    weights = model.weight_parameters()
    opt = torch.optim.SGD(weights, 0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return model, weights, opt, x, y


def _no_autocast():
    return torch.autocast('cpu', enabled=False)


@pytest.mark.parametrize('method', ['midas', 'darts'])
def test_mean_shift_moves_only_the_mixing_weights(method):
    from search import mean_shift_offsets, weight_step
    model, weights, opt, x, y = _step_setup(method, 'darts')
    arch_before = [p.detach().clone() for p in model.arch_parameters()]
    w_before = [p.detach().clone() for p in weights]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    offsets = mean_shift_offsets(model, x, y, _ms_args(), _no_autocast)
    assert model.mix_offset is None and not model.mix_clip and model.training
    assert set(offsets) == {'normal', 'reduce'} and offsets['normal'].shape == (14, 8)
    assert 0 < offsets['normal'].abs().max() <= 2 * 0.25  # T = 2 rounds within +-eps
    after = model.state_dict()   # its points are evaluated in eval mode, as MS-DARTS's: no BN statistics moved
    assert all(torch.equal(state[k], after[k]) for k in state)
    model.mix_offset = offsets
    weight_step(model, weights, opt, x, y, 5.0, 1, _no_autocast)
    model.mix_offset = None
    shifted = [p.detach().clone() for p in weights]
    assert all(torch.equal(a, p) for a, p in zip(arch_before, model.arch_parameters()))
    assert all(p.grad is None for p in model.arch_parameters())
    # the same step without the offset ends elsewhere: the offset did change the mixing
    model2, weights2, opt2, _, _ = _step_setup(method, 'darts')
    model2.load_state_dict(state)
    weight_step(model2, weights2, opt2, x, y, 5.0, 1, _no_autocast)
    assert any(not torch.equal(a, b) for a, b in zip(shifted, weights2))
    assert any(not torch.equal(a, b) for a, b in zip(shifted, w_before))


def test_zero_offset_changes_nothing():
    model, _, _, x, _ = _step_setup('midas')
    model.eval()
    with torch.no_grad():
        plain = model(x)
        model.mix_offset = {'normal': torch.zeros(6, 5)}
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


@pytest.mark.parametrize('reference', [True, False])   # --no-ms-reference: one kernel over both cell types
def test_mean_shift_weighs_points_by_softmax_of_loss_times_gaussian_kernel(reference):
    """MS-DARTS's rounds (METHOD.md §11) on a stand-in supernet whose loss, softplus of the offsets' weighted sum, is
    known: each round draws N points within +-eps of the centre and moves each cell type's part to its mean weighted
    by softmax(losses) times that type's exp(-|p - c|^2 / 2h^2), as perturb_ms.py does: towards the points of higher
    loss, which the weight step then trains for."""
    from search import mean_shift_offsets

    class Stand(torch.nn.Module):
        kind, space, mix_offset = 'darts', G.get_space('darts'), None

        def forward(self, x):
            s = self.mix_offset['normal'].sum() + 0.5 * self.mix_offset['reduce'].sum()
            return torch.stack([torch.zeros(()), s]).expand(len(x), 2)   # label 0: loss softplus(s)

    x, y = torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)
    args = _ms_args(ms_bandwidth=0.5, ms_reference=reference)
    got = mean_shift_offsets(Stand(), x, y, args, _no_autocast, generator=torch.Generator().manual_seed(0), eps=0.2)
    g, centre = torch.Generator().manual_seed(0), {t: torch.zeros(14, 8) for t in ('normal', 'reduce')}
    for _ in range(args.ms_iters):
        points = [dict(zip(centre, (c + 0.2 * d.view(14, 8) for c, d in zip(
            centre.values(), (2 * torch.rand(224, generator=g) - 1).split(112))))) for _ in range(args.ms_samples)]
        losses = torch.stack([F.softplus(p['normal'].sum() + 0.5 * p['reduce'].sum()) for p in points])
        new = {}
        for t in centre:
            kernel = torch.stack([torch.exp(-sum(((p[u] - centre[u]) ** 2).sum() for u in (
                [t] if reference else centre)) / (2 * args.ms_bandwidth ** 2)) for p in points])
            weight = losses.softmax(0) * kernel
            plain = sum(k * p[t] for k, p in zip(kernel / kernel.sum(), points))   # the kernel alone, no loss
            new[t] = sum(w * p[t] for w, p in zip(weight / weight.sum(), points))
            assert new[t].sum() > plain.sum()   # pulled towards the higher losses
        centre = new
    for t in centre:
        torch.testing.assert_close(got[t], centre[t])


def test_mean_shift_survives_a_kernel_that_underflows():
    """A narrow --ms-bandwidth over the DARTS space's 112 weights a cell type rounds every Gaussian kernel to 0 in
    float32: the weights, normalised in log space, still pick the nearest points, where 0 / 0 stopped the search
    on a NaN loss."""
    from search import mean_shift_offsets

    class Stand(torch.nn.Module):
        kind, space, mix_offset = 'darts', G.get_space('darts'), None

        def forward(self, x):
            return torch.stack([torch.zeros(()), self.mix_offset['normal'].sum()]).expand(len(x), 2)

    x, y = torch.zeros(3, 1), torch.zeros(3, dtype=torch.long)
    got = mean_shift_offsets(Stand(), x, y, _ms_args(ms_bandwidth=0.02), _no_autocast,
                             generator=torch.Generator().manual_seed(0), eps=0.25)
    for t in ('normal', 'reduce'):
        assert torch.isfinite(got[t]).all() and 0 < got[t].abs().max() <= 2 * 0.25


@pytest.mark.parametrize('reference', [True, False])
def test_mean_shift_reference_or_earlier_variant_evaluates_its_points_so(reference, monkeypatch):
    """--ms-reference (the default) takes each point's loss in eval mode at the clipped point; --no-ms-reference, the
    variant this code ran until 2026-12-07 and runs started then resume with, in train mode (BN statistics move)
    and unclipped."""
    import model as M
    from search import mean_shift_offsets
    clips = _count_calls(monkeypatch, M, 'clip_weights')
    model, _, _, x, y = _step_setup('darts', 'darts')
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mean_shift_offsets(model, x, y, _ms_args(ms_reference=reference), _no_autocast)
    assert (clips['clip_weights'] > 0) == reference and model.training and not model.mix_clip
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in state.items()) == reference


def test_mean_shift_evaluates_clipped_points_and_widens_its_box_over_the_search():
    """MS-DARTS clips each sampled point to the simplex before its loss is taken (SDARTS's clip: clamp each edge's
    weights to [0, 1], divide by their sum; an edge clamped to zeros keeps its largest weight), and its box grows from
    eps / 10 at the first epoch towards eps."""
    from model import clip_weights
    from search import ms_eps_at
    w = torch.tensor([[0.5, -0.2, 0.9], [-0.1, -0.3, -0.2]]).view(2, 3, 1, 1, 1)
    torch.testing.assert_close(clip_weights(w).flatten(1), torch.tensor([[0.5 / 1.4, 0, 0.9 / 1.4], [1.0, 0, 0]]))
    args = _ms_args(epochs=50)
    assert (ms_eps_at(args, 0), ms_eps_at(args, 25)) == pytest.approx((0.025, 0.025 + 0.225 / 2))
    model, _, _, x, _ = _step_setup('darts', 'darts')   # a static table: the clipped point is one table per type
    model.eval()
    g = torch.Generator().manual_seed(3)
    offsets = {t: 0.3 * (2 * torch.rand(14, 8, generator=g) - 1) for t in ('normal', 'reduce')}
    with torch.no_grad():
        model.mix_offset, model.mix_clip = offsets, True
        clipped = model(x)
        table = {t: model.alphas[t].softmax(-1) for t in offsets}
        model.mix_offset, model.mix_clip = {t: clip_weights((table[t] + o)[..., None, None, None]).squeeze()
                                            - table[t] for t, o in offsets.items()}, False
        torch.testing.assert_close(clipped, model(x))
        model.mix_offset = offsets   # unclipped: another point
        assert not torch.allclose(clipped, model(x))


@pytest.mark.parametrize('method', ['midas', 'darts'])
def test_steps_freeze_what_they_do_not_train(method):
    """arch_step with the weights frozen and weight_step with the architecture frozen take the same gradients
    as with nothing frozen (MIDAS's weights keep the gradient through the attention), skipping the
    others, and leave every parameter trainable afterwards."""
    from search import arch_step, weight_step
    grads = {}
    for freeze in (False, True):
        model, weights, opt, x, y = _step_setup(method, 'darts')
        arch = model.arch_parameters()
        arch_opt = torch.optim.SGD(arch, 0.0)
        arch_step(model, arch, arch_opt, x, y, 1, _no_autocast, weights if freeze else ())
        a = [p.grad.clone() for p in arch]
        w_opt = torch.optim.SGD(weights, 0.0)
        weight_step(model, weights, w_opt, x, y, 5.0, 1, _no_autocast, arch_params=arch if freeze else ())
        grads[freeze] = a, [p.grad.clone() for p in weights]
        assert all(p.requires_grad for p in model.parameters())
    for before, after in zip(*grads.values()):
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-7)


def test_search_optimisers_follow_the_darts_protocol(cifar, tmp_path):
    """METHOD.md §7: the architecture step is Adam with betas (0.5, 0.999) and --arch-weight-decay, the weight step
    SGD whose lr is cosine-annealed to --lr-min (not to 0) over the run. A search with other settings still runs
    and still decodes a cell: only these numbers tell."""
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY, '--lr-min', '0.002',
                 '--arch-weight-decay', '0.004', '--arch-lr', '0.0005'])
    state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    arch = state['arch_opt']['param_groups'][0]
    assert (tuple(arch['betas']), arch['weight_decay'], arch['lr']) == ((0.5, 0.999), 0.004, 0.0005)
    w = state['w_opt']['param_groups'][0]
    assert (w['momentum'], w['weight_decay']) == (0.9, 3e-4)
    assert w['lr'] == pytest.approx(0.002)   # the end of the cosine: --lr-min
    assert (state['scheduler']['T_max'], state['scheduler']['eta_min']) == (1, 0.002)


def test_search_weight_step_clips_the_gradient_norm():
    """The weight step clips the weights' gradient to norm --grad-clip (§7: 5); 0 turns clipping off."""
    from search import weight_step
    moved = []
    for clip in (1e-3, 0.0):
        model, weights, _, x, y = _step_setup('midas')
        before = [p.detach().clone() for p in weights]
        weight_step(model, weights, torch.optim.SGD(weights, 1.0), x, y, clip, 1, _no_autocast)
        moved.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(weights, before)]).norm().item())
    assert moved[0] == pytest.approx(1e-3, rel=1e-3) and moved[1] > 1e-2


def test_detach_mixing_changes_only_midas_weight_gradient():
    """--detach-mixing: DARTS's weight step is the same step (alpha is a constant there anyway); MIDAS's
    weights lose the gradient through the attention, and keep the one through the mixing."""
    from search import weight_step
    for method in ('darts', 'midas'):
        grads = []
        for detach in (False, True):
            model, weights, opt, x, y = _step_setup(method, 'darts')
            weight_step(model, weights, torch.optim.SGD(weights, 0.0), x, y, 5.0, 1, _no_autocast,
                        arch_params=model.arch_parameters(), detach_mixing=detach)
            grads.append(torch.cat([p.grad.flatten() for p in weights]))
        if method == 'darts':
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
        else:
            assert not torch.allclose(grads[1], grads[0]) and grads[1].abs().sum() > 0


@pytest.mark.parametrize('method, mim', [('midas', False), ('darts', False), ('midas', True)])
def test_unrolled_step_at_zero_lr_is_the_first_order_step(method, mim):
    """--unrolled: at weight lr 0 the virtual step stays at w and the Hessian term vanishes, so the
    architecture gradient is the first-order one; the weights are restored exactly. With --mim the virtual
    step takes the weight step's loss, the MIM decoder's weights among the weights (the val loss leaves them
    unused: zeros, not an error)."""
    from model import MIMDecoder
    from search import arch_step, unrolled_arch_step
    grads = []
    for unrolled in (False, True):
        model, weights, opt, x, y = _step_setup(method, 'darts')
        masking = None
        if mim:
            decoder = MIMDecoder(model.feature_channels, model.feature_stride)
            weights = weights + list(decoder.parameters())
            opt = torch.optim.SGD(weights, 0.1, momentum=0.9)
            masking = (decoder, 1.0, 0.5, 4, None)
        arch = model.arch_parameters()
        arch_opt = torch.optim.SGD(arch, 0.0)
        before = [p.detach().clone() for p in weights]
        if unrolled:
            unrolled_arch_step(model, arch, weights, arch_opt, opt, (x, y), (x.flip(0), y.flip(0)), 0.0,
                               search.get_args([]), 1, _no_autocast, masking)
        else:
            arch_step(model, arch, arch_opt, x, y, 1, _no_autocast, weights)
        assert all(torch.equal(a, p) for a, p in zip(before, weights))
        grads.append(torch.cat([p.grad.flatten() for p in arch]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


class _Toy(torch.nn.Module):
    """A two-parameter 'supernet' (weights w, architecture a) in float64, for steps whose exact result autograd can
    give."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64))

    def forward(self, x, w=None, a=None, detach_mixing=False):
        w, a = self.w if w is None else w, self.a if a is None else a
        return torch.tanh(x @ w) @ a.softmax(0)


@pytest.mark.parametrize('nesterov', [False, True])
def test_unrolled_step_is_the_gradient_through_the_virtual_step(nesterov):
    """--unrolled (DARTS's second order): the architecture gradient is d/da L_val(w', a), w' the weights after the
    step the weight optimizer would take (w - lr (d + momentum buf), d = dL_train/dw + wd w; with --nesterov
    w - lr (d + momentum (momentum buf + d))), its Hessian term by finite differences. Against autograd's exact
    derivative at lr 0.5 (at lr 0 the Hessian term vanishes, so a wrong sign or scale of it shows only here)."""
    from search import unrolled_arch_step
    model = _Toy()
    g = torch.Generator().manual_seed(1)
    x_tr, x_val = torch.randn(2, 8, 4, generator=g, dtype=torch.float64)
    y_tr, y_val = torch.randint(0, 3, (2, 8), generator=g)
    args, lr = search.get_args(['--nesterov'] if nesterov else []), 0.5
    w_opt = torch.optim.SGD([model.w], lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=nesterov)
    buf = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w_opt.state[model.w]['momentum_buffer'] = buf
    w, a = model.w.detach().clone().requires_grad_(), model.a.detach().clone().requires_grad_()
    d_train = torch.autograd.grad(F.cross_entropy(model(x_tr, w, a), y_tr), w, create_graph=True)[0]
    d = d_train + args.weight_decay * w
    w_virtual = w - lr * (d + args.momentum * (args.momentum * buf + d) if nesterov else d + args.momentum * buf)
    real = copy.deepcopy(w_opt)   # the formula above is the step PyTorch's SGD takes
    real.param_groups[0]['params'][0].grad = d_train.detach()
    real.step()
    torch.testing.assert_close(real.param_groups[0]['params'][0], w_virtual.detach())
    exact = torch.autograd.grad(F.cross_entropy(model(x_val, w_virtual, a), y_val), a)[0]
    unrolled_arch_step(model, [model.a], [model.w], torch.optim.SGD([model.a], 0.0), w_opt, (x_val, y_val),
                       (x_tr, y_tr), lr, args, 1, _no_autocast)
    first_order = torch.autograd.grad(F.cross_entropy(model(x_val, w_virtual.detach(), a), y_val), a)[0]
    assert (exact - first_order).norm() > 0.05 * exact.norm()   # the Hessian term matters here
    torch.testing.assert_close(model.a.grad, exact, rtol=1e-4, atol=1e-7)
    assert torch.equal(model.w, w)   # restored


def test_unrolled_finite_differences_run_without_autocast_on_one_draw(monkeypatch):
    """Under bf16 autocast (--amp auto on a GPU) the finite differences' nudge, eps v with eps = 0.01 / ||v||, is
    about 1e-6 of a weight in a real supernet, and bf16 keeps 3e-3: measured on an 8-channel NB201 supernet, the
    Hessian term under bf16 was noise (the arch gradient 1.6 times its size off float32's at lr 0.25, 0.56 with the
    two losses in float32). The virtual step's loss keeps the run's precision; the two Hessian losses do not, and
    they read one draw of S4's 'noise' (a draw each left a tiny S4 supernet's arch gradient at 2.7 times the norm
    it has with one: 0.283 against 0.105)."""
    from search import unrolled_arch_step
    model = _Toy().float()
    g = torch.Generator().manual_seed(1)
    x_tr, x_val = torch.randn(2, 8, 4, generator=g)
    y_tr, y_val = torch.randint(0, 3, (2, 8), generator=g)
    seen, draws, train_loss = [], [], search.train_loss

    def spy(*a):   # S4's 'noise' would draw here: both finite-difference points must read one draw
        seen.append(torch.is_autocast_enabled('cpu'))
        draws.append(torch.rand(1))
        return train_loss(*a)

    monkeypatch.setattr(search, 'train_loss', spy)
    args = search.get_args([])
    unrolled_arch_step(model, [model.a], [model.w], torch.optim.SGD([model.a], 0.0), torch.optim.SGD([model.w], 0.1),
                       (x_val, y_val), (x_tr, y_tr), 0.1, args, 1, lambda: torch.autocast('cpu', dtype=torch.bfloat16))
    assert seen == [True, False, False]
    assert torch.equal(draws[1], draws[2]) and not torch.equal(draws[0], draws[1])


def test_mim_loss_is_zero_unmasked_and_trains_the_decoder():
    from model import MIMDecoder, mask_patches, mim_loss
    from search import weight_step
    x = torch.randn(2, 3, 32, 32)
    masked, mask = mask_patches(x, 0.0, 4)
    assert mask.sum() == 0 and torch.equal(masked, x) and mim_loss(torch.zeros_like(x), x, mask) == 0
    masked, mask = mask_patches(x, 0.25, 8)
    assert mask.shape == (2, 1, 32, 32) and mask.mean() == 0.25
    assert torch.equal(masked[mask.expand_as(x) > 0], torch.zeros(int(mask.sum()) * 3))
    # reconstruction error counts masked pixels only
    recon = x.clone()
    recon[mask.expand_as(x) == 0] += 5
    assert mim_loss(recon, x, mask) == 0

    for ratio in (0.0, 0.5):
        model, weights, opt, x, y = _step_setup('midas')
        decoder = MIMDecoder(model.feature_channels, model.feature_stride)
        params = list(decoder.parameters())
        weight_step(model, weights + params, opt.__class__(weights + params, 0.1), x, y, 5.0, 1, _no_autocast,
                    (decoder, 1.0, ratio, 4, None))
        grads = torch.cat([p.grad.flatten() for p in params])
        assert (grads.abs().sum() > 0) == (ratio > 0)
        assert decoder(torch.randn(1, model.feature_channels, 8, 8)).shape == (1, 3, 32, 32)


def _count_calls(monkeypatch, module, *names):
    """Wrap each module.name so that its calls are counted. -> {name: calls so far}."""
    calls = dict.fromkeys(names, 0)

    def counted(name, fn):
        def wrapped(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapped
    for name in names:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    return calls


@pytest.mark.parametrize('space, method, flags', [
    *[(space, method, ['--mim', '1.0', '--mean-shift', '--arch-warmup', '0'])
      for space in G.SPACES for method in ('darts', 'midas')],   # both flags, every space, both methods
    ('s3', 'darts', ['--mean-shift', '--arch-warmup', '0']),
    ('darts', 'midas', ['--mim', '0.5', '--mim-ratio', '0.75', '--mim-patch', '8']),
    ('s3', 'midas', ['--unrolled']), ('nb201', 'darts', ['--unrolled', '--mim', '0.5']),   # second order, end to end
])
def test_tiny_search_with_mim_and_mean_shift(cifar, tmp_path, monkeypatch, space, method, flags):
    real, eps = search.mean_shift_offsets, []

    def recording(*a, **kw):   # the box MS-DARTS grows over the search: a tenth of --ms-eps in the first epoch
        eps.append(a[7])
        return real(*a, **kw)
    monkeypatch.setattr(search, 'mean_shift_offsets', recording)
    calls = _count_calls(monkeypatch, search, 'mim_loss', 'mean_shift_offsets', 'unrolled_arch_step')
    save = str(tmp_path / 'run')
    g = search.main(['--data', cifar, '--save', save, '--space', space, '--method', method, *TINY, *flags])
    assert eps == [pytest.approx(0.025)] * len(eps)
    G.validate_genotype(g, space)
    state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)
    assert (state['mim_decoder'] is not None) == ('--mim' in flags)
    steps = 16 // 8   # --subset 32 split in two halves, batch 8: once in every step, only when asked
    # MIM is part of the training loss, which the unrolled step takes three more times: at w', w+ and w-
    mim = steps * ('--mim' in flags) * (4 if '--unrolled' in flags else 1)
    assert calls == {'mim_loss': mim, 'mean_shift_offsets': steps * ('--mean-shift' in flags),
                     'unrolled_arch_step': steps * ('--unrolled' in flags)}
    if '--mean-shift' in flags:   # a run started before --ms-reference resumes as it ran: the earlier variant
        started = json.loads(open(os.path.join(save, 'args.json')).read())
        assert started['ms_reference'] is True
        del started['ms_reference']
        open(os.path.join(save, 'args.json'), 'w').write(json.dumps(started))
        assert search.get_args(['--resume', save]).ms_reference is False


def test_aux_skip_adds_every_stride_one_input_and_decays_to_zero(monkeypatch):
    """--aux-skip (DARTS-): with the searched mixture taken out, a cell is its auxiliary skips alone: node k is beta
    times the sum of its stride-1 inputs (a reduction cell's edges from its inputs have none), and beta 0 is the
    supernet without them."""
    import model as M
    assert [M.aux_skip_weight(e, 5) for e in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    torch.manual_seed(0)
    net = SearchNetwork('nb201', C=4, cells=1).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = net(x)
    net.aux_skip = True
    assert torch.equal(net(x), plain)   # beta 0
    net.aux_beta.fill_(0.5)
    assert not torch.allclose(net(x), plain)
    monkeypatch.setattr(M, 'mix_node', lambda maps, weights: torch.zeros_like(maps[0]))
    b = 0.5
    cell = net.search_cells()[0]
    s = torch.randn(2, 4, 8, 8)
    # nodes 1..3: b x, b (x + b x), b (x + b x + b (1 + b) x) = b (1 + b)^2 x
    assert torch.allclose(cell([s], aux_beta=torch.tensor(b)), b * (1 + b) ** 2 * s)
    darts = SearchNetwork('darts', C=4, layers=3).eval()
    normal, reduce = darts.search_cells()[0], darts.search_cells()[1]
    s0, s1 = torch.randn(2, 12, 8, 8), torch.randn(2, 12, 8, 8)
    out = normal([s0, s1], aux_beta=torch.tensor(b))
    p0, p1 = normal.preprocess0(s0), normal.preprocess1(s1)
    n2 = b * (p0 + p1)
    n3 = b * (p0 + p1 + n2)
    assert torch.allclose(out[:, :4], n2) and torch.allclose(out[:, 4:8], n3)
    s0, s1 = torch.randn(2, 12, 8, 8), torch.randn(2, 16, 8, 8)   # node 2 of a reduction cell: stride-2 edges only
    assert torch.equal(reduce([s0, s1], aux_beta=torch.tensor(b)), torch.zeros(2, 32, 4, 4))


def test_aux_skip_search_ends_without_the_skips(cifar, tmp_path):
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY, '--epochs', '2', '--aux-skip'])
    net, settings = analyze.load_run(save, torch.device('cpu'))
    assert settings['aux_skip'] and net.aux_skip and net.aux_beta.item() == 0.0   # the last epoch's beta
    with open(os.path.join(save, 'log.txt')) as f:
        log = f.read()
    assert 'epoch 1/2: aux-skip beta 1.000' in log and 'epoch 2/2: aux-skip beta 0.000' in log
    plain = str(tmp_path / 'plain')   # the skips trained with the first epoch: another supernet than without them
    search.main(['--data', cifar, '--save', plain, '--space', 'nb201', *TINY, '--epochs', '2'])
    a, b = (torch.load(os.path.join(s, 'checkpoint.pt'), weights_only=False)['model'] for s in (save, plain))
    assert not _same_weights(a, b)
    one = str(tmp_path / 'one')   # one epoch at beta 1: the final decode reads it without the skips, as a resume does
    search.main(['--data', cifar, '--save', one, '--space', 'nb201', *TINY, '--aux-skip'])
    with open(os.path.join(one, 'weights.json')) as f:
        first = json.load(f)['weights']
    search.main(['--resume', one, '--data', cifar])
    with open(os.path.join(one, 'weights.json')) as f:
        assert json.load(f)['weights'] == first
    assert analyze.load_run(one, torch.device('cpu'))[0].aux_beta.item() == 0.0   # as the decode read it


def test_arch_warmup_keeps_the_architecture_still(cifar, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch, search, 'arch_step')
    torch.manual_seed(0)
    fresh = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=False))
    for n_epochs in (1, 2):
        save = str(tmp_path / f'run{n_epochs}')
        torch.manual_seed(0)
        search.main(['--data', cifar, '--save', save, '--space', 'nb201', *TINY, '--arch-warmup', '1',
                     '--epochs', str(n_epochs)])
        arch = _arch_state(save)
        fresh_arch = {k: v for k, v in fresh.state_dict().items() if k in arch}
        assert arch.keys() == fresh_arch.keys()
        # still through the warm-up, moved by the steps after it: two, the second epoch's (16 images, batch 8)
        assert all(torch.equal(arch[k], fresh_arch[k]) for k in arch) == (n_epochs == 1)
        assert calls['arch_step'] == 2 * (n_epochs - 1)
        with open(os.path.join(save, 'log.txt')) as f:   # a warm-up as long as the run: said, not silent
            assert ('no architecture step is taken' in f.read()) == (n_epochs == 1)


def test_nb201_results_table(tmp_path):
    import analyze
    runs = []
    for k, (method, valid, test) in enumerate([('midas', 90.0, 93.0), ('midas', 91.0, 94.0), ('darts', 88.0, 91.0),
                                               ('midas', 80.0, 85.0), ('midas', 70.0, 75.0), ('midas', 60.0, 65.0),
                                               ('midas', 50.0, 55.0), ('midas', 40.0, 45.0), ('midas', 30.0, 35.0),
                                               ('darts', 88.0, 91.0), ('midas', 20.0, 25.0), ('midas', 92.0, 95.0),
                                               ('midas', 10.0, 15.0), ('midas', 5.0, 8.0)]):
        run = tmp_path / f'r{k}'
        run.mkdir()
        args = {'method': method, 'patch': 4, 'seed': k, 'mim': 0.0, 'mean_shift': False, 'token': 'meanstd',
                'tau': 0.5 if k == 3 else 1.0,   # a different temperature is a different setting
                'key_offset': k == 4, 'token_before_bn': k == 5, 'score_bias': k == 6, 'epochs': 2, 'init_channels': 8,
                'cells': 1, 'subset': 10000}
        if k != 10:   # run 10 is older than --edge-norm: its tokens were normalised one by one
            args['edge_norm'] = True
        if k == 8:   # the others have no 'detach_mixing', as runs older than the flag: the whole gradient
            args['detach_mixing'] = True
        if k == 9:   # MIDAS's flags change nothing for darts: its runs group whatever they were given
            args.update(patch=0, attn_dim=64, score_bias=True)
        if k != 1:   # runs older than the flag have no 'arch_warmup': they had none, and group with 0
            args['arch_warmup'] = 5 if k == 7 else 0
        if k == 12:   # seed 1 of run 1's setting at another learning rate: a row of its own, which names it
            args.update(seed=1, lr=0.1)
        if k == 13:   # run 0 re-decoded with --decode-none include (genotype.json says so; args.json cannot)
            args.update(seed=0)
        (run / 'args.json').write_text(json.dumps(args))
        first = {'epoch': 1} if k == 13 else {'epoch': 1, 'nb201': {'valid': valid - 1, 'test': test - 1}}   # unscored
        (run / 'history.json').write_text(json.dumps([first, {'epoch': 2, 'nb201': {'valid': valid, 'test': test}}]))
        # run 11 is run 0's search chosen again with --select perturb (resumed: its args.json is run 0's)
        result = {'arch': G.NB201_BEST, 'nb201': {'valid': valid, 'test': test},
                  **({'select': 'perturb'} if k == 11 else {}), **({'decode_none': 'include'} if k == 13 else {})}
        if k == 11:
            (run / 'args.json').write_text((tmp_path / 'r0' / 'args.json').read_text())
        (run / 'genotype.json').write_text(json.dumps(result))
        runs.append(str(run))
    text = analyze.nb201_results(runs)
    budget = '2 ep, 8 ch, 1 cell/stage, 10k img'
    assert f'| midas patch 4 | {budget} | 0,1 | 90.50 ± 0.50 | 93.50 ± 0.50 | 92.50 → 93.50 |' in text
    assert f'| darts | {budget} | 2,9 | 88.00 ± 0.00 | 91.00 ± 0.00 | 90.00 → 91.00 |' in text
    assert f'| midas patch 4 tau 0.5 | {budget} | 3 | 80.00 | 85.00 | 84.00 → 85.00 |' in text
    assert f'| midas patch 4 key-offset | {budget} | 4 | 70.00 | 75.00 | 74.00 → 75.00 |' in text
    assert f'| midas patch 4 token before BN | {budget} | 5 | 60.00 | 65.00 | 64.00 → 65.00 |' in text
    assert f'| midas patch 4 score-bias | {budget} | 6 | 50.00 | 55.00 | 54.00 → 55.00 |' in text
    assert f'| midas patch 4 arch-warmup 5 | {budget} | 7 | 40.00 | 45.00 | 44.00 → 45.00 |' in text
    assert f'| midas patch 4 detach-mixing | {budget} | 8 | 30.00 | 35.00 | 34.00 → 35.00 |' in text
    assert f'| midas patch 4 token-wise LN | {budget} | 10 | 20.00 | 25.00 | 24.00 → 25.00 |' in text
    assert f'| midas patch 4 select perturb | {budget} | 0 | 92.00 | 95.00 | 94.00 → 95.00 |' in text
    assert f'| midas patch 4 lr 0.1 | {budget} | 1 | 10.00 | 15.00 | 14.00 → 15.00 |' in text
    # its epochs were decoded with the run's rule, which --redecode cannot change (history.json holds no weights)
    assert (f'| midas patch 4 decode-none include | {budget} | 0 | 5.00 | 8.00 | '
            f'– → 8.00 (epochs decoded with --decode-none exclude) |') in text
    assert search.get_args([]).detach_mixing is False   # what the name leaves unsaid
    assert 'Hessian' not in text   # no run measured it
    for k, eigs in ((2, [0.1, 0.5]), (9, [0.3, 0.7])):   # --hessian-samples: a column of its own, by epoch
        (tmp_path / f'r{k}' / 'history.json').write_text(json.dumps(
            [{'epoch': e + 1, 'nb201': {'valid': 87.0 + e, 'test': 90.0 + e}, 'hessian_eig': v,
              **({'hessian_settled': False} if (k, e) == (9, 1) else {})} for e, v in enumerate(eigs)]))
    text = analyze.nb201_results([runs[0], runs[2], runs[9]])
    assert 'mean Hessian eigenvalue by epoch' in text
    assert f'| darts | {budget} | 2,9 | 88.00 ± 0.00 | 91.00 ± 0.00 | 90.00 → 91.00 | 0.2 → ~0.6 |' in text
    assert f'| midas patch 4 | {budget} | 0 | 90.00 | 93.00 | 92.00 → 93.00 | – → – |' in text
    # a search on CIFAR-100: the other datasets are CIFAR-10 and ImageNet16-120; unscored, the table scores it
    c100 = tmp_path / 'c100'
    c100.mkdir()
    (c100 / 'args.json').write_text(json.dumps({'method': 'darts', 'seed': 0, 'dataset': 'cifar100'}))
    (c100 / 'history.json').write_text(json.dumps([{'epoch': 1}]))
    (c100 / 'genotype.json').write_text(json.dumps({'arch': G.NB201_BEST}))
    scored = tmp_path / 'scored'   # a run scored by another table: --nb201-table rescores its epochs too
    shutil.copytree(c100, scored)
    (scored / 'history.json').write_text(json.dumps([{'epoch': 1, 'genotype': {'space': 'nb201', 'arch': G.NB201_BEST},
                                                      'nb201': {'valid': 90.0, 'test': 93.0}}]))
    with pytest.raises(analyze.RunError, match='searched without --nb201-table'):
        analyze.nb201_results([str(c100)])
    table = tmp_path / 'nb201.csv'
    table.write_text(f'arch,c10_valid,c10_test,c100_valid,c100_test,in16_valid,in16_test\n{G.NB201_BEST},1,2,3,4,5,6\n')
    text = analyze.nb201_results([str(c100)], str(table))
    assert ('| NB201 valid | NB201 test | CIFAR-10 valid | CIFAR-10 test | ImageNet16-120 valid | ImageNet16-120 '
            'test |') in text
    assert '| 3.00 | 4.00 | 1.00 | 2.00 | 5.00 | 6.00 | – |' in text   # no epoch's cell in its history
    assert '| 3.00 | 4.00 | 1.00 | 2.00 | 5.00 | 6.00 | 4.00 |' in analyze.nb201_results([str(scored)], str(table))
    # JSON of the wrong shape (hand-edited, or another tool's): one line naming the run, not a traceback
    for name, text in (('history.json', '[[1]]'), ('history.json', 'null'),
                       ('genotype.json', '{"arch": "x", "nb201": 1}')):
        bad = tmp_path / f'bad-{len(text)}'
        shutil.copytree(scored, bad)
        (bad / name).write_text(text)
        _one_line_error(run_script('analyze.py', 'nb201', str(bad)), str(bad))


def test_nb201_results_rows_name_what_sets_them_apart(tmp_path):
    """A second-order search and another dataset are settings of their own, and their rows say so; what changes
    nothing (--topology in NB201, a static table's decode sizes) groups with the rest."""
    import analyze

    def run(name, **flags):
        folder = tmp_path / name
        folder.mkdir()
        (folder / 'args.json').write_text(json.dumps({'method': 'midas', 'patch': 4, 'seed': 0, 'epochs': 2,
                                                      'init_channels': 8, 'cells': 1, 'subset': 10000,
                                                      'edge_norm': True, **flags}))
        score = {'valid': 80.0, 'test': 85.0}
        (folder / 'history.json').write_text(json.dumps([{'epoch': 1, 'nb201': score}]))
        (folder / 'genotype.json').write_text(json.dumps({'arch': G.NB201_BEST, 'nb201': score}))
        return str(folder)
    text = analyze.nb201_results([run('m0'), run('m1', seed=1, topology=True), run('u0', unrolled=True),
                                  run('c0', dataset='cifar100'), run('d0', method='darts'),
                                  run('d1', method='darts', seed=1, decode_samples=512, epoch_decode_samples=64),
                                  # --edge-norm is part of the tokens' LayerNorm: without it, the same search
                                  run('n0', token_norm=False), run('n1', seed=1, token_norm=False, edge_norm=False)])
    budget = '2 ep, 8 ch, 1 cell/stage, 10k img'
    for row in ('midas patch 4 | {} | 0,1 |', 'midas patch 4 + unrolled | {} | 0 |',
                'midas patch 4 on cifar100 | {} | 0 |', 'darts | {} | 0,1 |', 'midas patch 4 no-LN | {} | 0,1 |'):
        assert '| ' + row.format(budget) in text
    assert len([line for line in text.splitlines() if budget in line]) == 5


# ---------------------------------------------------------------------------------------------
# bench.py

def test_bench_reports_every_figure_as_one_json_line():
    token_bn = not ArchConfig.token_bn   # a search flag given to bench reaches the supernet it times
    r = run_script('bench.py', '--space', 'nb201', '--init-channels', '4', '--cells', '1', '--batch-size', '4',
                   '--token-bn' if token_bn else '--no-token-bn', '--iters', '2', '--warmup', '1', '--mem-iters', '1',
                   '--train-channels', '4',
                   '--train-layers', '2', '--train-batch-size', '4', '--data-images', '64', '--data-epochs', '1',
                   '--epoch-images', '100', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    for key in ('search_iter_s_midas', 'search_iter_s_darts', 'search_ratio_midas_darts', 'peak_mem_mb_midas',
                'peak_mem_mb_darts', 'peak_mem_ratio', 'train_step_s', 'data_images_per_s', 'decode_s_midas',
                'search_epoch_s_midas', 'search_epoch_s_darts', 'search_run_h_midas', 'search_run_h_darts'):
        assert res[key] > 0 and math.isfinite(res[key]), key
    assert res['search_ratio_midas_darts'] == pytest.approx(res['search_iter_s_midas'] / res['search_iter_s_darts'])
    assert res['data_images_per_s'] == pytest.approx(res['data_images_timed'] / res['data_s'])   # from the JSON alone
    for m in ('midas', 'darts'):   # an epoch: --epoch-images // batch iterations, then the decode
        assert res[f'search_epoch_s_{m}'] == pytest.approx(100 // 4 * res[f'search_iter_s_{m}'] + res[f'decode_s_{m}'])
        assert res[f'search_run_h_{m}'] > res['search_epochs'] * res[f'search_epoch_s_{m}'] / 3600
    assert res['device'].startswith('cpu') and res['space'] == 'nb201' and res['token_bn'] is token_bn
    assert any('midas / darts' in line for line in lines[:-1])  # the table comes before the JSON


def test_bench_bad_flags_are_one_line(tmp_path):
    r = run_script('bench.py', '--skip', 'everything')
    _one_line_error(r, '--skip')
    r = run_script('bench.py', '--skip', 'search,memory,train,data')   # an empty table, exit 0, before
    _one_line_error(r, 'nothing to measure')
    r = run_script('bench.py', '--train-channels', '0', '--skip', 'search,memory,data')   # not the default's 0
    _one_line_error(r, '--train-channels must be at least 1')
    r = run_script('bench.py', '--batch-size', '1', '--skip', 'search,memory,data')   # the retraining step's follows
    _one_line_error(r, '--train-batch-size must be at least 2')
    # what search.py refuses, bench.py does not time: bf16 on the CPU where its dilated-convolution kernel is wrong
    if not search.dilated_bf16_grads_ok():
        r = run_script('bench.py', '--amp', 'bf16', '--device', 'cpu', '--init-channels', '2', '--layers', '3',
                       '--batch-size', '2', '--skip', 'memory,train,data')
        _one_line_error(r, '--amp bf16 on the CPU', 'dil_conv')


def test_bench_memory_child_that_fails_is_one_line(monkeypatch):
    """A memory child killed (out of memory, a crash) is named with its exit code and last line, in one line."""
    import bench
    crashed = subprocess.CompletedProcess([], -11, '', 'Traceback (most recent call last):\n  ...\nMemoryError: out')
    monkeypatch.setattr(bench.subprocess, 'run', lambda *a, **k: crashed)
    with pytest.raises(train.RunError, match=r'^the memory measurement of midas .* exit code -11: MemoryError: out$'):
        bench.bench_memory(bench.get_args([]), [])


def test_data_throughput_tool_bad_input_is_one_line(tmp_path):
    r = run_script('data.py', '--data', str(tmp_path / 'nowhere'))
    _one_line_error(r, 'cifar-10-batches-py not found', 'https://')
    r = run_script('data.py', '--fake', '--batch-size', '0')
    _one_line_error(r, '--batch-size must be at least 1')
    r = run_script('data.py', '--fake', '--device', 'gpu')
    _one_line_error(r, '--device gpu: not a device')
    _one_line_error(run_script('data.py', '--fake', '--device', 'meta'), '--device meta: this torch sees no such')
    _one_line_error(run_script('data.py', '--fake', '--cutout', '33'), '--cutout 33 is larger than the 32x32')
    _one_line_error(run_script('data.py', '--data', ''), '--data: an empty path')   # not "put it under ,"
    if not torch.cuda.is_available():
        r = run_script('data.py', '--fake', '--device', 'cuda')
        _one_line_error(r, '--device cuda: this torch sees no such device')


def test_fake_datasets_of_a_few_images_load(tmp_path):
    """Fewer images than batch files leaves some files empty: still official files, which load."""
    for name, n in (('cifar10', 3), ('imagenet16-120', 4), ('cifar100', 0)):
        data.write_cifar_like(tmp_path / name, name, n, 2)
        x, y = data.load_dataset(name, str(tmp_path / name), train=True, download=False)
        assert len(x) == len(y) == n


def test_help_of_every_script_states_the_defaults(capsys):
    """--help must print (a stray '%' in a help text breaks it) and show the defaults an ablation flips."""
    import bench
    for module in (search, train, bench, analyze):
        with pytest.raises(SystemExit) as stop:
            module.get_args(['--help'])
        assert stop.value.code == 0, module.__name__
        text = ' '.join(capsys.readouterr().out.split())
        assert 'usage:' in text, module.__name__
        if module is search:
            for phrase in ('0 = global pooling (default 4)', 'query/key dimension d, §3 (default 16)',
                           'Adam lr of the architecture step (default 0.0003)', '--epochs EPOCHS (default 50)',
                           '--no-token-norm LayerNorm on query/key tokens (default True)'):
                assert phrase in text, phrase


def _documented_commands(markdown):
    """The argument lists of every `python` and `torchrun` call in a Markdown file's bash blocks, as bash expands
    them: the blocks run in order (variables and loops included) with python and torchrun only recording."""
    with open(os.path.join(HERE, markdown)) as f:
        blocks = re.findall(r'```bash\n(.*?)```', f.read(), re.S)
    with tempfile.TemporaryDirectory() as d:
        calls = os.path.join(d, 'calls')
        harness = (f'record() {{ printf "%s\\x1f" "$@" >> {calls}; echo >> {calls}; }}\n'
                   'python() { record "$@"; }\ntorchrun() { record "$@"; }\npip() { :; }\n')
        subprocess.run(['bash', '-c', harness + '\n'.join(blocks)], cwd=d, capture_output=True, timeout=60)
        with open(calls) as f:
            return [line.split('\x1f')[:-1] for line in f.read().splitlines()]


@pytest.mark.parametrize('markdown', ['README.md', 'BENCHMARKS.md'])
def test_the_documented_commands_use_flags_that_exist(markdown):
    """A renamed or dropped flag breaks the docs silently: every documented call of a project script parses."""
    import bench
    scripts = {'search.py': search, 'train.py': train, 'bench.py': bench, 'analyze.py': analyze}
    parsed = 0
    for argv in _documented_commands(markdown):
        at = [k for k, a in enumerate(argv) if a in scripts]
        if at:
            scripts[argv[at[0]]].get_args(argv[at[0] + 1:])   # argparse exits on an unknown flag or a bad value
            parsed += 1
    assert parsed >= {'README.md': 20, 'BENCHMARKS.md': 5}[markdown]


# ---------------------------------------------------------------------------------------------
# Against independent references: the plain ops, DARTS's and NAS-Bench-201's structures, METHOD.md's tables, the
# images a loader was given. Most tests above compare two paths of this code with each other (compiled and eager,
# shared and per-edge, resumed and uninterrupted); hand-made bugs that changed both sides alike passed them.

@pytest.mark.parametrize('reduction', [False, True])
def test_mixed_op_candidates_are_the_plain_ops_on_the_edge_input(reduction):
    """Each candidate map of a supernet edge is OPS[name](C, stride, affine=False)(x) - with DARTS's BN after a pool
    (model_search.py) - whether the cell hands it relu(x) or not: stripping the leading ReLU is an optimisation that
    must not change a value."""
    import torch.nn as nn
    from model import MixedOp
    from ops import OPS
    torch.manual_seed(0)
    stride = 2 if reduction else 1
    edge = MixedOp(4, stride, G.PRIMITIVES, bn_after_pool=True).train()
    x = torch.randn(3, 4, 8, 8)
    for shared in (None, {}):
        for x_relu in (None, F.relu(x)):
            outs = edge(x, x_relu, shared)
            for j, out in zip(edge.live, outs):
                name = G.PRIMITIVES[j]
                ref = OPS[name](4, stride, False)
                if 'pool' in name:
                    ref = nn.Sequential(ref, nn.BatchNorm2d(4, affine=False))
                ref.load_state_dict(edge._ops[edge.live.index(j)].state_dict())
                torch.testing.assert_close(out, ref.train()(x), msg=name)


def test_darts_supernet_pools_end_in_a_bn_and_nb201_pools_do_not():
    """DARTS's model_search.py puts a BN (no affine) after every pool candidate; NAS-Bench-201's search cell does
    not."""
    import torch.nn as nn
    for space, bn in (('darts', True), ('s1', True), ('nb201', False)):
        net = SearchNetwork(space, C=4, layers=3, cells=1)
        pools = [op for cell in net.search_cells() for edge in cell._ops
                 for j, op in zip(edge.live, edge._ops) if 'pool' in edge.primitives[j]]
        assert pools
        for op in pools:
            bns = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
            assert len(bns) == bn and all(not m.affine for m in bns), space
            assert not bn or isinstance(op[-1], nn.BatchNorm2d)


def test_averaged_weights_are_the_mean_over_the_cells_of_a_type():
    """§8: average over samples and patches per cell, then over all cells of the same type. s3 with 3 layers has two
    reduction cells; give them different weights and batch sizes: each cell counts once."""
    from model import WeightAverager
    model = SearchNetwork('s3', C=4, layers=3)
    avg = WeightAverager(model)
    c1, c2 = [c for c in model.search_cells() if c.reduction]
    for cell, value, batch in ((c1, 0.2, 2), (c2, 0.6, 6)):
        for n in range(4):
            avg(cell, n, [torch.full((batch, 3, 2, 2), value) for _ in range(n + 2)], None, None)
    weights = avg.result()['reduce']['weights']
    assert len(weights) == 14
    assert all(x == pytest.approx(0.4) for row in weights for x in row)


def test_cell_drop_path_drops_ops_but_never_the_identity():
    """DARTS's Cell: in training, every op but the identity goes through drop_path; in eval mode nothing does."""
    from model import Cell
    torch.manual_seed(0)
    s0, s1 = torch.randn(64, 8, 8, 8), torch.randn(64, 8, 8, 8)
    skips = G.Genotype([('skip_connect', 0), ('skip_connect', 1)] * 4, [2, 3, 4, 5],
                       [('max_pool_3x3', 0), ('max_pool_3x3', 1)] * 4, [2, 3, 4, 5])
    convs = skips._replace(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4)
    for genotype, dropped in ((skips, False), (convs, True)):
        cell = Cell(genotype, 8, 8, 4, False, False).train()
        torch.manual_seed(1)
        with_dp = cell(s0, s1, drop_prob=0.5)
        without = cell(s0, s1, drop_prob=0.0)
        assert (not torch.allclose(with_dp, without)) == dropped, genotype.normal[0][0]
        assert torch.equal(cell.eval()(s0, s1, drop_prob=0.5), cell(s0, s1, drop_prob=0.0))


def test_nb201_nodes_sum_every_edge_even_with_topology_asked_for():
    """§5: 'always in NAS-Bench-201 x_k = sum_e m[e]': a supernet built with topology=True (the MIDAS default of
    ArchConfig) has no gamma on any NB201 node."""
    torch.manual_seed(0)
    gammas = []
    net = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(topology=True)).eval()
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32), recorder=lambda cell, n, w, gamma, pi: gammas.append(gamma))
    assert len(gammas) == 9 and all(g is None for g in gammas)


def test_search_decodes_on_the_search_train_split(cifar, tmp_path, monkeypatch):
    """§8: the decode set is the search-train split (its first --decode-samples images, un-augmented)."""
    seen = []
    decode = search.decode

    def record(model, batches, args):
        batches = list(batches)
        seen.append(torch.cat([x for x, _ in batches]))
        return decode(model, batches, args)

    monkeypatch.setattr(search, 'decode', record)
    search.main(['--data', cifar, '--save', str(tmp_path / 'run'), '--space', 'nb201', *TINY])
    x, _ = data.load_dataset('cifar10', cifar, download=False)
    train_idx, _ = data.split_indices(32, 0.5)
    meta = data.DATASETS['cifar10']
    expected = data.normalize(x[:32][train_idx][:16], meta['mean'], meta['std'])
    assert len(seen) == 2   # one epoch's decode, the final one
    for got in seen:
        torch.testing.assert_close(got, expected)


def test_mim_reconstructs_the_original_pixels_under_the_mask():
    """alpha-DARTS: the decoder recovers the masked pixels of the *original* image from the masked image's
    features; a target of the masked image itself (zeros there) is trivially learnt."""
    from model import MIMDecoder, mask_patches, mim_loss
    model, _, _, x, y = _step_setup('midas')
    decoder = MIMDecoder(model.feature_channels, model.feature_stride)
    masked, mask = mask_patches(x, 0.5, 4, torch.Generator().manual_seed(0))
    loss, logits = search.train_loss(model, x, y, (decoder, 0.7, 0.5, 4, None), (masked, mask))
    logits2, fmap = model(masked, features=True)
    expected = F.cross_entropy(logits2, y) + 0.7 * mim_loss(decoder(fmap), x, mask)
    torch.testing.assert_close(loss, expected)
    assert abs(mim_loss(decoder(fmap), masked, mask).item() - mim_loss(decoder(fmap), x, mask).item()) > 1e-3


S1_TABLE = """\
skip_connect dil_conv_3x3 | max_pool_3x3 avg_pool_3x3
skip_connect dil_conv_5x5 | max_pool_3x3 dil_conv_3x3
skip_connect dil_conv_5x5 | max_pool_3x3 avg_pool_3x3
skip_connect sep_conv_3x3 | max_pool_3x3 avg_pool_3x3
skip_connect dil_conv_3x3 | skip_connect dil_conv_5x5
max_pool_3x3 skip_connect | max_pool_3x3 avg_pool_3x3
skip_connect sep_conv_3x3 | max_pool_3x3 sep_conv_3x3
skip_connect sep_conv_3x3 | skip_connect dil_conv_3x3
skip_connect dil_conv_3x3 | skip_connect dil_conv_5x5
skip_connect sep_conv_3x3 | max_pool_3x3 avg_pool_3x3
max_pool_3x3 skip_connect | max_pool_3x3 avg_pool_3x3
skip_connect dil_conv_3x3 | skip_connect dil_conv_5x5
dil_conv_3x3 dil_conv_5x5 | skip_connect dil_conv_5x5
dil_conv_3x3 dil_conv_5x5 | skip_connect dil_conv_5x5"""


def test_rdarts_spaces_are_the_published_ones():
    rows = [[half.split() for half in line.split('|')] for line in S1_TABLE.splitlines()]
    assert G.SPACES['s1']['normal'] == [r[0] for r in rows]
    assert G.SPACES['s1']['reduce'] == [r[1] for r in rows]
    for name, ops in (('s2', ['skip_connect', 'sep_conv_3x3']), ('s3', ['none', 'skip_connect', 'sep_conv_3x3']),
                      ('s4', ['noise', 'sep_conv_3x3'])):
        for cell in ('normal', 'reduce'):
            assert G.SPACES[name][cell] == [ops] * 14, (name, cell)
    assert G.SPACES['darts']['normal'] == [G.PRIMITIVES] * 14
    assert G.SPACES['nb201']['normal'] == [['none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3']] * 6


@pytest.mark.parametrize('src', [2, 3, -1])
def test_validate_refuses_an_input_that_is_not_an_earlier_state(src):
    bad = G.DARTS_V2._replace(normal=[('sep_conv_3x3', src)] + G.DARTS_V2.normal[1:])   # node 2 reads 0..1
    with pytest.raises(ValueError, match='must be in 0..1'):
        G.validate_genotype(bad)


def test_gpuloader_batches_are_flipped_and_shifted_crops_of_their_images():
    n = 64
    x = (torch.arange(n * 3 * 8 * 8) % 251 + 1).to(torch.uint8).view(n, 3, 8, 8)
    mean, std = data.DATASETS['cifar10']['mean'], data.DATASETS['cifar10']['std']
    q = data.GPULoader(x, torch.arange(n), 16, mean, std, crop_pad=0, seed=0)
    flipped = 0
    for xb, yb in q:
        for img, i in zip(xb, yb.tolist()):
            plain = data.normalize(x[i:i + 1], mean, std)[0]
            assert torch.equal(img, plain) or torch.equal(img, plain.flip(-1))
            flipped += torch.equal(img, plain.flip(-1))
    assert 0.3 * n < flipped < 0.7 * n
    q = data.GPULoader(x, torch.arange(n), 16, mean, std, crop_pad=2, flip=False, seed=0)
    xb, yb = q.next_batch()
    shifted = sum(not torch.equal(img, data.normalize(x[i:i + 1], mean, std)[0]) for img, i in zip(xb, yb.tolist()))
    assert shifted > 8


def test_imagenet16_keeps_the_first_120_classes_shifted_to_zero(tmp_path):
    folder = tmp_path / 'ImageNet16'
    folder.mkdir()
    labels = [1, 2, 119, 120, 121, 500, 1000]
    with open(folder / 'val_data', 'wb') as f:
        pickle.dump({'data': np.zeros((len(labels), 3 * 16 * 16), np.uint8), 'labels': labels}, f)
    _, y = data.load_dataset('imagenet16-120', str(tmp_path), train=False, download=False)
    assert y.tolist() == [0, 1, 118, 119]


def test_ops_have_the_reference_structure():
    import torch.nn as nn
    from ops import OPS
    conv = lambda m: [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    for name in ('nor_conv_1x1', 'nor_conv_3x3'):   # NB201 ReLU-Conv-BN
        assert [type(m) for m in OPS[name](4, 1, True)] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d], name
    for name, k, d in (('sep_conv_3x3', 3, 1), ('sep_conv_5x5', 5, 1), ('dil_conv_3x3', 3, 2), ('dil_conv_5x5', 5, 2)):
        op = OPS[name](4, 2, True)
        depthwise = [c for c in conv(op) if c.groups > 1]
        assert all(c.kernel_size == (k, k) and c.dilation == (d, d) and c.padding == (d * (k - 1) // 2,) * 2
                   for c in depthwise), name
        assert depthwise[0].stride == (2, 2) and all(c.stride == (1, 1) for c in depthwise[1:]), name   # first only
    pool = OPS['avg_pool_3x3'](4, 1, True)
    assert pool.count_include_pad is False   # DARTS and NB201: border pixels average their real neighbours
    corner = pool(torch.ones(1, 1, 4, 4))[0, 0, 0, 0]
    assert corner == 1.0


def test_train_step_clips_the_unscaled_gradient_under_fp16_loss_scaling():
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 5)
    params = list(net.parameters())
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    args = argparse.Namespace(label_smoothing=0.0, auxiliary_weight=0.0, grad_clip=0.01, report_freq=1, epochs=1)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, 1.0)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    train.train_epoch(lambda inp: (net(inp), None), params, [(x, y)], 1, opt, scaler, _no_autocast, args,
                      1, 0, 1.0, train.Throughput(1), lambda msg: None)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]).norm().item()
    assert moved == pytest.approx(0.01, rel=1e-4)


def test_unrolled_finite_differences_nudge_by_0_01_in_norm(monkeypatch):
    """DARTS: w+- = w -+ eps dL_val/dw' with eps = 0.01 / ||dL_val/dw'||: the two points are 0.02 apart."""
    model, weights, opt, x, y = _step_setup('midas')
    arch = model.arch_parameters()
    points = []
    train_loss = search.train_loss

    def record(m, *a, **kw):
        points.append(torch.cat([p.detach().flatten().clone() for p in weights]))
        return train_loss(m, *a, **kw)

    monkeypatch.setattr(search, 'train_loss', record)
    args = argparse.Namespace(detach_mixing=False)
    search.unrolled_arch_step(model, arch, weights, torch.optim.Adam(arch, 3e-4), opt, (x, y), (x, y), 0.025, args,
                              1, _no_autocast)
    assert len(points) == 3
    assert (points[1] - points[2]).norm().item() == pytest.approx(0.02, rel=1e-3)


# ---- gap tests (helper 5) ----

def test_nb201_supernet_edges_read_the_states_the_arch_string_names():
    """A one-hot static table makes each NB201 supernet cell the discrete cell of the arch string its decode gives:
    edge e of the supernet reads the state that position e of the arch string names (|op~0|+|op~0|op~1|+...), so
    the cell that is decoded, and looked up in the table, is the one that was searched. Parameter-free ops only:
    their maps are the same in both networks, bit for bit."""
    from model import InferCell, average_weights
    arch = '|avg_pool_3x3~0|+|avg_pool_3x3~0|skip_connect~1|+|skip_connect~0|none~1|avg_pool_3x3~2|'
    ops = G.nb201_parse(arch)
    net = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(method='darts')).eval()
    with torch.no_grad():
        table = torch.zeros(6, 5)
        for e, op in enumerate(ops):
            table[e, G.NB201_PRIMITIVES.index(op)] = 1e4   # softmax: exactly one-hot
        net.alphas['normal'].copy_(table)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cell = net.search_cells()[0]
    with torch.no_grad():
        torch.testing.assert_close(cell([x], alpha=net.alphas['normal']), InferCell(arch, 4)(x), rtol=0, atol=0)
    args = argparse.Namespace(space='nb201', decode_none='include', topology=False)
    decoded, _ = search.decode_weights(average_weights(net, [(torch.randn(2, 3, 16, 16), None)]), args)
    assert decoded == arch


def test_noise_is_independent_of_its_input():
    """RDARTS S4's 'noise' is N(0, 1) shaped like its (strided) input and carries nothing of it: the same draw for
    any input, mean 0, std 1."""
    from ops import OPS
    for stride in (1, 2):
        op = OPS['noise'](4, stride, False)
        outs = []
        for x in (torch.zeros(64, 4, 16, 16), torch.full((64, 4, 16, 16), 100.0)):
            torch.manual_seed(0)
            outs.append(op(x))
        assert outs[0].shape == (64, 4, 16 // stride, 16 // stride)
        assert torch.equal(outs[0], outs[1])
        assert abs(outs[0].mean().item()) < 0.02 and abs(outs[0].std().item() - 1) < 0.02


def test_patch_grid_is_the_floor_of_the_map_over_the_patch():
    """§2: g = max(1, H // PS) cells per side; a patch side that does not divide the map gives uneven patches, not an
    extra partial one (32 // 6 = 5, not 6), and a patch larger than the map one cell."""
    assert grid_size(32, 32, 6) == (5, 5) and grid_size(16, 16, 6) == (2, 2) and grid_size(8, 8, 16) == (1, 1)
    assert grid_size(32, 16, 4) == (8, 4)
    net = SearchNetwork('nb201', C=4, cells=1, cfg=ArchConfig(patch=6)).eval()
    grids = []
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32), recorder=lambda c, n, w, gamma, pi: grids.append(tuple(w[0].shape[-2:])))
    assert grids == [(5, 5)] * 3 + [(2, 2)] * 3 + [(1, 1)] * 3   # 32, 16 and 8 pixel maps


def test_the_query_is_the_nodes_pooled_inputs_in_order():
    """§3: a node's query reads each of its input states pooled to the grid, concatenated in input order: for node 2
    of a DARTS cell the two preprocessed cell inputs, for node 3 those and node 2."""
    torch.manual_seed(0)
    C = 4
    cell = SearchCell('darts', G.get_space('darts')['normal'], C, C, C, False, False, ArchConfig(patch=4)).eval()
    seen = []
    for attention in cell.attention[:2]:
        attention.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    g = torch.Generator().manual_seed(1)
    s0, s1 = (torch.randn(2, C, 16, 16, generator=g) for _ in range(2))
    with torch.no_grad():
        out = cell([s0, s1])
        states = [cell.preprocess0(s0), cell.preprocess1(s1), out[:, :C]]
    pooled = [pool_grid(s, 4, 4) for s in states]
    torch.testing.assert_close(seen[0], torch.cat(pooled[:2], 1))
    torch.testing.assert_close(seen[1], torch.cat(pooled, 1))


def test_averaged_weights_average_the_patches_and_leave_the_mode_as_it_was():
    """§8: w, gamma and pi are averaged over samples *and patches*; the supernet is read in eval mode and handed
    back in the mode it came in."""
    from model import WeightAverager, average_weights
    model = SearchNetwork('s3', C=4, layers=3)
    avg = WeightAverager(model)
    cell = model.search_cells()[0]
    w = torch.zeros(2, 3, 2, 2)
    w[:, 1, 0, 0], w[:, 2, 1, 1] = 1.0, 0.5   # one patch each: a first-patch-only mean would see 1 and 0
    avg(cell, 0, [w, w], None, None)
    assert avg.result()['normal']['weights'][0] == pytest.approx([0.0, 0.25, 0.125])
    x = torch.randn(2, 3, 16, 16)
    for training in (True, False):
        model.train(training)
        average_weights(model, [(x, None)])
        assert model.training == training


def test_search_final_decode_reads_decode_samples_and_each_epoch_epoch_decode_samples(cifar, tmp_path, monkeypatch):
    """--epoch-decode-samples caps each epoch's decode, --decode-samples the final one (TINY sets both to 16)."""
    seen = []
    decode = search.decode

    def record(model, batches, args):
        batches = list(batches)
        seen.append(sum(len(y) for _, y in batches))
        return decode(model, batches, args)

    monkeypatch.setattr(search, 'decode', record)
    search.main(['--data', cifar, '--save', str(tmp_path / 'run'), '--space', 'nb201', *TINY,
                 '--epoch-decode-samples', '8', '--decode-samples', '12'])
    assert seen == [8, 12]


def test_min_margin_is_the_smallest_op_or_edge_margin():
    margins = {'normal': [{'op_margin': 0.3, 'edge_margin': None}, {'op_margin': 0.2, 'edge_margin': 0.05}],
               'reduce': [{'op_margin': None, 'edge_margin': 0.1}]}
    assert search.min_margin(margins) == pytest.approx(0.05)
    assert search.min_margin({'normal': [{'op_margin': None, 'edge_margin': None}]}) is None


def test_normalize_is_x_over_255_less_mean_over_std():
    """The loaders' normalisation against its formula, not against itself: (x / 255 - mean) / std per channel."""
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4) * 5
    mean, std = data.DATASETS['cifar10']['mean'], data.DATASETS['cifar10']['std']
    want = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(data.normalize(x, mean, std).double(), want, rtol=0, atol=1e-5)
    q = data.GPULoader(x, torch.arange(2), 2, mean, std, shuffle=False, augment=False)
    torch.testing.assert_close(q.next_batch()[0].double(), want, rtol=0, atol=1e-5)


def test_mim_loss_is_the_mean_squared_error_over_the_masked_values():
    """alpha-DARTS's reconstruction loss: the mean of (recon - x)^2 over the masked pixels' values (3 per pixel)."""
    from model import mask_patches, mim_loss
    x = torch.randn(2, 3, 32, 32)
    _, mask = mask_patches(x, 0.5, 4, torch.Generator().manual_seed(0))
    assert mim_loss(x + 1, x, mask).item() == pytest.approx(1.0)
    recon = x + 2 * mask   # off by 2 on the masked pixels only
    assert mim_loss(recon, x, mask).item() == pytest.approx(4.0)


def test_clip_weights_clamps_to_one_before_renormalising():
    """SDARTS's clip: each weight clamped to [0, 1], both ends, then each edge divided by its sum."""
    from model import clip_weights
    w = torch.tensor([1.5, 0.5, -0.2]).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(clip_weights(w).flatten(), torch.tensor([1.0, 0.5, 0.0]) / 1.5)


def test_history_records_the_weight_steps_accuracy_as_train_and_the_architecture_steps_as_val(cifar, tmp_path,
                                                                                              monkeypatch):
    """history.json's train_acc is the weight steps' (search-train) accuracy, val_acc the architecture steps'
    (search-val): here every weight step is right and every architecture step wrong."""
    arch_step, weight_step = search.arch_step, search.weight_step

    def wrong(*a, **kw):
        loss, _ = arch_step(*a, **kw)
        return loss, torch.zeros((), dtype=torch.long)

    def right(model, weights, opt, x, y, *a, **kw):
        loss, _ = weight_step(model, weights, opt, x, y, *a, **kw)
        return loss, torch.tensor(len(y))

    monkeypatch.setattr(search, 'arch_step', wrong)
    monkeypatch.setattr(search, 'weight_step', right)
    save = tmp_path / 'run'
    search.main(['--data', cifar, '--save', str(save), '--space', 'nb201', *TINY])
    (entry,) = json.loads((save / 'history.json').read_text())
    assert (entry['train_acc'], entry['val_acc']) == (100.0, 0.0)


def test_decoded_darts_cells_concatenate_all_four_nodes():
    """§9: a DARTS cell's output is the concat of its 4 intermediate nodes, in every decoded genotype."""
    weights = {t: torch.rand(14, 8, generator=torch.Generator().manual_seed(0)).tolist() for t in ('normal', 'reduce')}
    g, _ = G.decode_darts('darts', weights)
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]


def test_train_evaluation_reads_the_network_in_eval_mode():
    """The test figures are the eval-mode network's (BN running statistics, no drop path, no auxiliary head), not a
    training-mode forward's batch statistics."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.BatchNorm1d(7)).train()
    x, y = 3 * torch.randn(10, 4) + 1, torch.randint(0, 7, (10,))
    _, autocast, _ = train.amp_setup('off', torch.device('cpu'))
    result = train.evaluate(lambda inp: (net(inp), None), net, [(x, y)], autocast, torch.device('cpu'), 1)
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.BatchNorm1d(7)).eval()
    with torch.no_grad():
        assert result['test_loss'] == pytest.approx(F.cross_entropy(fresh(x), y).item(), rel=1e-6)


def test_train_every_epoch_trains_in_training_mode_after_an_evaluation(cifar, tmp_path, monkeypatch):
    """evaluate() leaves the network in eval mode: each epoch must put it back into training mode (BN batch
    statistics, drop path, the auxiliary head), not only the first."""
    modes, real = [], train.train_epoch

    def recording(forward, *a, **kw):
        modes.append(forward.training)
        return real(forward, *a, **kw)

    monkeypatch.setattr(train, 'train_epoch', recording)
    train.main(['--genotype', 'DARTS_V2', '--data', cifar, '--save', str(tmp_path / 'run'), *TRAIN_TINY,
                '--layers', '3', '--subset', '32', '--epochs', '2', '--eval-freq', '1'])
    assert modes == [True, True]
