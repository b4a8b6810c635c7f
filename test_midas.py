"""Tests: run with `python -m pytest -q test_midas.py` (a few minutes on 2 CPU cores).
They make their own data in the official file formats and never need ../shared."""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import data
import genotypes as G
import search
from model import ArchConfig, SearchNetwork, edge_weights, grid_size, mix_add, pool_grid

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

    class Op:
        def __init__(self, live):
            self.live = live

    scores = [torch.randn(2, 3, 1, 1) for _ in range(4)]
    ops = [Op([1, 2])] * 4  # candidate 0 plays 'none': excluded from the edge logit
    w, gamma, pi = edge_weights(scores, ops, topology=True)
    logits = [s[:, 1:].logsumexp(1) for s in scores]
    pairs = list(itertools.combinations(range(4), 2))
    raw = torch.stack([logits[a] + logits[b] for a, b in pairs]).softmax(0)
    torch.testing.assert_close(pi, raw)
    for e in range(4):
        torch.testing.assert_close(gamma[e], sum(raw[p] for p, pair in enumerate(pairs) if e in pair))
    _, g2, p2 = edge_weights(scores[:2], ops[:2], topology=True)
    torch.testing.assert_close(g2, torch.ones_like(g2))  # two inputs: one pair, both edges kept


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


def test_architecture_parameters_are_separate():
    m = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig())
    arch, weights = m.arch_parameters(), m.weight_parameters()
    assert len(arch) == 3 * 4 * 2                 # (W_q, W_k) per node per cell
    assert {id(p) for p in arch}.isdisjoint(id(p) for p in weights)
    assert len(arch) + len(weights) == len(list(m.parameters()))
    d = SearchNetwork('darts', C=4, layers=3, cfg=ArchConfig(method='darts'))
    assert [tuple(p.shape) for p in d.arch_parameters()] == [(14, 8), (14, 8)]


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
    with open(os.path.join(save, 'weights.json')) as f:
        record = json.load(f)
    assert set(record['weights']) == ({'normal'} if space == 'nb201' else {'normal', 'reduce'})


def test_nb201_table_scores_the_decoded_cell(cifar, tmp_path, capsys):
    table = tmp_path / 'nb201.csv'
    rows = ['index,arch,c10_valid,c10_test']
    for k, ops in enumerate(itertools.product(G.NB201_PRIMITIVES, repeat=6)):
        rows.append(f'{k},{G.nb201_str(ops)},{k % 97 / 1.0},{k % 89 / 1.0}')
    table.write_text('\n'.join(rows) + '\n')
    save = str(tmp_path / 'run')
    arch = search.main(['--data', cifar, '--save', save, '--space', 'nb201', '--nb201-table', str(table), *TINY])
    k = [G.nb201_str(ops) for ops in itertools.product(G.NB201_PRIMITIVES, repeat=6)].index(arch)
    out = capsys.readouterr().out
    assert f'valid {k % 97:.2f} test {k % 89:.2f}' in out
    with open(os.path.join(save, 'genotype.json')) as f:
        assert json.load(f)['nb201'] == {'valid': k % 97, 'test': k % 89}


def _arch_state(save):
    state = torch.load(os.path.join(save, 'checkpoint.pt'), weights_only=False)['model']
    return {k: v for k, v in state.items() if 'attention' in k or 'alphas' in k}


def test_same_seed_same_result(cifar, tmp_path):
    outs = []
    for k in range(2):
        save = str(tmp_path / f'run{k}')
        outs.append(search.main(['--data', cifar, '--save', save, '--space', 's3', '--epochs', '2', *TINY[2:]]))
    assert outs[0] == outs[1]
    a, b = _arch_state(str(tmp_path / 'run0')), _arch_state(str(tmp_path / 'run1'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_sigkill_equals_uninterrupted_run(cifar, tmp_path):
    args = ['search.py', '--data', cifar, '--space', 'nb201', '--epochs', '3', '--batch-size', '8',
            '--init-channels', '4', '--cells', '1', '--subset', '160', '--epoch-decode-samples', '16',
            '--decode-samples', '16', '--device', 'cpu', '--no-download']
    full = str(tmp_path / 'full')
    r = run_script(*args, '--save', full)
    assert r.returncode == 0, r.stderr

    killed = str(tmp_path / 'killed')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE)
    proc = subprocess.Popen([sys.executable, *args, '--save', killed], cwd=HERE, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = os.path.join(killed, 'checkpoint.pt')
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert torch.load(ckpt, weights_only=False)['epoch'] < 3
    assert not os.path.exists(os.path.join(killed, 'genotype.json'))

    r = run_script(*args, '--save', killed, '--resume', killed)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(full, 'genotype.json')) as f1, open(os.path.join(killed, 'genotype.json')) as f2:
        assert json.load(f1) == json.load(f2)
    a, b = _arch_state(full), _arch_state(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
])
def test_bad_flags(cifar, tmp_path, flags, words):
    _one_line_error(run_script('search.py', '--data', cifar, '--save', str(tmp_path / 'r'), *TINY, *flags), *words)
    assert not os.path.exists(tmp_path / 'r' / 'checkpoint.pt')


def test_missing_and_corrupt_data(cifar, tmp_path):
    r = run_script('search.py', '--data', str(tmp_path / 'nowhere'), '--save', str(tmp_path / 'r'), *TINY)
    _one_line_error(r, 'cifar-10-batches-py')
    broken = tmp_path / 'broken'
    data.write_cifar_like(str(broken), 'cifar10', 100, 20)
    batch = broken / 'cifar-10-batches-py' / 'data_batch_1'
    batch.write_bytes(batch.read_bytes()[:1000])
    r = run_script('search.py', '--data', str(broken), '--save', str(tmp_path / 'r2'), *TINY)
    _one_line_error(r, 'data_batch_1')


def test_resume_from_another_configuration_is_refused(cifar, tmp_path):
    save = str(tmp_path / 'run')
    search.main(['--data', cifar, '--save', save, '--space', 's2', *TINY])
    r = run_script('search.py', '--data', cifar, '--resume', save, '--space', 's3', *TINY)
    _one_line_error(r, 'another configuration', 'space')
    r = run_script('search.py', '--data', cifar, '--save', save, '--space', 's2', *TINY)
    _one_line_error(r, '--resume')
