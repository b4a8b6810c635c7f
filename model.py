"""Search supernets with the MIDAS attention (METHOD.md §1-6) and the evaluation networks.

MIDAS replaces DARTS's static table alpha by scores computed per input and per spatial patch:
  tokens  t[e,j] = mean of candidate output F[e,j] over each cell of a g x g grid     (§2;
                  by default its spread over the cell too, token='meanstd', and LayerNorm: ArchConfig)
  scores  s[e,j] = <W_q z, W_k t[e,j]> / (sqrt(d) tau), z = the node's pooled inputs  (§3)
  mixing  m[e]   = sum_j up(softmax_j s[e,:]) * F[e,j]                                 (§4)
  node    x_k    = sum_e up(gamma[e]) m[e], gamma from a softmax over pairs of edges  (§5)
`method='darts'` swaps s for a learned table shared by all cells of a type (§6), in the same code.
Imports ops.py and genotypes.py only, by their names, so these three files can be copied into another project as
top-level modules.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from genotypes import cell_types, get_space, nb201_parse, node_inputs, node_pairs
from ops import OPS, FactorizedReduce, Identity, Noise, ReLUConvBN


@dataclass(frozen=True)
class ArchConfig:
    """Everything that decides how the mixing weights are made; one flag each in search.py."""
    method: str = 'midas'      # 'midas' (attention) or 'darts' (static alpha)
    patch: int = 4             # patch side in pixels at the node's resolution; 0 = global pooling
    topology: bool | None = None  # parameter-free pair-of-edges node (§5), DARTS-style spaces only; None: MIDAS's
    attn_dim: int = 16         # d, the query/key dimension (16: best NB201 valid column of 16, 32, 64; README)
    tau: float = 1.0           # softmax temperature of the scores
    token: str = 'meanstd'     # 'mean': patch mean (§2); 'meanstd': mean and spread, breaks the skip/pool tie (§12)
    token_norm: bool = True    # LayerNorm (no affine) on query and key tokens: sharper scores (§12)
    edge_norm: bool = True     # with token_norm: an edge's key tokens normalised together, keeping relative scale
    key_offset: bool = False   # a learned d-vector added to each live candidate's key (§12; a deviation)
    token_before_bn: bool = False  # tokens from the input of a candidate's final BN, not its output (§12)
    score_bias: bool = False   # a learned scalar on each live candidate's score: an alpha inside MIDAS (a deviation)
    share_attention: bool = False  # the cells of a stage share one attention per node, as DARTS's alpha (a deviation)
    token_bn: bool = False     # tokens of parameter-free candidates without a final BN standardised as if they had one
    decorrelate: bool = False  # each candidate's mean score from the mean query and key: no query-key covariance
    decorrelate_free: bool = False  # the same for the parameter-free candidates alone (identity, pools)

    def __post_init__(self):
        if self.method not in ('midas', 'darts'):
            raise ValueError(f"unknown method '{self.method}' (choose from midas, darts)")
        if self.topology is None:   # on for MIDAS; DARTS's baseline is DARTS's node, a plain sum (§6)
            object.__setattr__(self, 'topology', self.method == 'midas')
        if not isinstance(self.patch, int) or isinstance(self.patch, bool) or self.patch < 0:
            raise ValueError(f'patch must be a non-negative integer (0 = global pooling), got {self.patch!r}')
        if self.token not in ('mean', 'meanstd'):
            raise ValueError(f"unknown token '{self.token}' (choose from mean, meanstd)")
        if self.attn_dim < 1 or not self.tau > 0:
            raise ValueError('attn_dim must be >= 1 and tau > 0')


# ---------------------------------------------------------------------------------------------
# Grid helpers: a g_h x g_w grid of patches over an H x W map

# torch.compile traces the plain-op paths below, which its code generator fuses; the autograd Functions are
# hand-fused kernels for eager mode
compiling = torch.compiler.is_compiling
_plain_paths = False   # set inside twice_differentiable()


@contextlib.contextmanager
def twice_differentiable():
    """Inside it the supernet takes the plain-op paths it takes under torch.compile, whose graph a second
    derivative (a Hessian-vector product) differentiates again. Outside it the answer is the same: a Function's
    backward asked for a graph (create_graph=True) recomputes its forward by the plain ops and differentiates
    that, at the cost of a second forward of each node's tokens and mixing."""
    global _plain_paths
    before, _plain_paths = _plain_paths, True
    try:
        yield
    finally:
        _plain_paths = before


def plain_paths():
    return _plain_paths or compiling()


def grid_size(h, w, patch):
    if patch == 0:
        return 1, 1
    return max(1, h // patch), max(1, w // patch)


def pool_grid(x, gh, gw):
    """Mean over each grid cell -> B x C x gh x gw. avg_pool2d when the grid divides the map: a
    dedicated kernel, several times faster on CPU than a mean over a 6-d view."""
    b, c, h, w = x.shape
    if gh == 1 and gw == 1:
        return x.mean((2, 3), keepdim=True)
    if h % gh == 0 and w % gw == 0:
        return F.avg_pool2d(x, (h // gh, w // gw))
    return F.adaptive_avg_pool2d(x, (gh, gw))


_VAR_MIN = 1e-8  # the variance below which a patch counts as flat: keeps sqrt and its gradient finite


def std_grid(x, mean, gh, gw):
    """Per-patch standard deviation, from E[x^2] - E[x]^2 (one extra pooling, no unfolded copy)."""
    return (pool_grid(x * x, gh, gw) - mean * mean).clamp_min(_VAR_MIN).sqrt()


# Channels-last fast paths. A B x C x H x W map in channels-last memory is NHWC, which views without a copy as
# B x gh x ph x gw x pw x C: a patch's pw pixels along W and their C channels form one contiguous run. Per-patch
# weights and per-patch statistics then broadcast over that whole run, where on the 4-d map they broadcast over
# C alone (8 floats at the first stage of an 8-channel supernet: too short for a 16-float vector register).
_NARROW = 16  # channels below which the token statistics use the longer pw * C runs (one AVX2 register = 8 floats)


def _patches(f, gh, gw):
    """The channels-last map f viewed B x gh x ph x gw x pw x C (no copy); None for any other layout."""
    if not f.is_contiguous(memory_format=torch.channels_last):
        return None
    b, c, h, w = f.shape
    return f.permute(0, 2, 3, 1).view(b, gh, h // gh, gw, w // gw, c)


def _unpatch(x6):
    """Inverse of _patches for a contiguous B x gh x ph x gw x pw x C tensor: a channels-last B x C x H x W map."""
    b, gh, ph, gw, pw, c = x6.shape
    return x6.view(b, gh * ph, gw * pw, c).permute(0, 3, 1, 2)


def _pw_runs(t, pw):
    """Per-patch statistics ... x gh x gw x C -> ... x gh x 1 x gw x (pw C), each value repeated over its patch's
    pw pixels, to broadcast against a map's B x gh x ph x gw x (pw C) view."""
    *lead, gw, c = t.shape
    return t.unsqueeze(-2).expand(*lead, gw, pw, c).reshape(*lead, gw, pw * c).unsqueeze(-3)


class _PatchTokens(torch.autograd.Function):
    """The 'meanstd' tokens of K candidate maps on a grid that divides them, K x B x gh x gw x 2C: per patch the
    mean of each channel, then its standard deviation sqrt(max(E[f^2] - E[f]^2, 1e-8)), written straight into one
    tensor. Autograd would keep every f * f alive (a quarter more activation memory in the DARTS space) and run
    a chain of a dozen kernels (stack, square, subtract, clamp, sqrt, cat and their backwards); the backward here
    needs only the maps, which the mixing keeps anyway, and the small token itself."""

    @staticmethod
    def forward(ctx, grid, *maps):
        gh, gw = grid
        (b, c, h, w), k = maps[0].shape, len(maps)
        n = (h // gh) * (w // gw)   # pixels per patch
        # float32 moments even under autocast: E[f^2] - E[f]^2 cancels, and bf16 keeps three digits
        dtype = torch.promote_types(maps[0].dtype, torch.float32)
        token = maps[0].new_empty(k, b, gh, gw, 2 * c, dtype=dtype)
        mean, square = token[..., :c], token[..., c:]
        rows = c < _NARROW and all(f.is_contiguous(memory_format=torch.channels_last) for f in maps)
        # One scratch map holds each f * f in turn: a fresh full-size temporary per map is a fresh block of
        # memory from the OS on CPU, and its page faults cost more than the multiplication (measured: 3.5x).
        scratch = torch.empty_like(maps[0], dtype=dtype)
        for f, m, s in zip(maps, mean, square):
            f = f.to(dtype)
            if rows:   # sums over ph (an outer dim), then over pw: faster than pooling for few channels
                v = _patches(f, gh, gw)
                torch.sum(v.sum(2), 3, out=m)
                torch.sum(torch.mul(v, v, out=_patches(scratch, gh, gw)).sum(2), 3, out=s)
            else:
                m.copy_(pool_grid(f, gh, gw).permute(0, 2, 3, 1))
                s.copy_(pool_grid(torch.mul(f, f, out=scratch), gh, gw).permute(0, 2, 3, 1))
        if rows:
            token.div_(n)
        square.addcmul_(mean, mean, value=-1.0).clamp_min_(_VAR_MIN).sqrt_()   # the variance, then the std
        ctx.kernel, ctx.rows = (h // gh, w // gw), rows
        ctx.save_for_backward(token, *maps)
        return token

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():   # create_graph: a graph of the gradient is wanted, which the plain ops make
            token, *maps = ctx.saved_tensors
            return (None, *_regrad(lambda *f: _plain_tokens(f, *token.shape[2:4], 'meanstd'), maps, grad))
        # token = (m, s): m = mean f, s = sqrt(mean f^2 - m^2). With n pixels per patch, d m / df = 1/n and
        # d s / df = (f - m) / (n s), so df = up(a) + f up(b), a = (g_m - m g_s / s) / n, b = g_s / (s n).
        token, *maps = ctx.saved_tensors
        (ph, pw), c = ctx.kernel, token.shape[-1] // 2
        mean, std = token[..., :c], token[..., c:]
        flat = std <= std.new_full((), _VAR_MIN).sqrt_()   # clamped patches, to the bit: no gradient there
        b = (grad[..., c:] / std).masked_fill_(flat, 0.0)
        a = torch.addcmul(grad[..., :c], b, mean, value=-1.0).div_(ph * pw)
        b.div_(ph * pw)                                  # K x B x gh x gw x C
        grads = []
        if ctx.rows:  # a + f b over (pw C) runs, the runs of all K maps made at once
            a, b = _pw_runs(a, pw), _pw_runs(b, pw)
        for f, ak, bk, needed in zip(maps, a, b, ctx.needs_input_grad[1:]):
            # a + f b in float32 (the tokens' precision), each map's gradient then cast to its own: a and f b
            # cancel where a patch's mean dwarfs its spread, and under autocast a node mixes bf16 convolution
            # maps with float32 identity and pool maps (a no-op for float32 maps)
            v = _patches(f, *token.shape[2:4])
            if not needed:
                grads.append(None)
            elif v is None:
                f32 = f.to(ak.dtype)
                up = lambda g: torch.ops.aten.avg_pool2d_backward(g.permute(0, 3, 1, 2), f32, ctx.kernel, ctx.kernel,
                                                                  (0, 0), False, True, None) * (ph * pw)
                grads.append(torch.addcmul(up(ak), f32, up(bk)).to(f.dtype))
            elif ctx.rows:
                grads.append(_unpatch(torch.addcmul(ak, v.flatten(4), bk).view(v.shape).to(f.dtype)))
            else:       # a + f b broadcast over the patch pixels
                grads.append(_unpatch(torch.addcmul(ak[:, :, None, :, None], v, bk[:, :, None, :, None]).to(f.dtype)))
        return (None, *grads)


def patch_tokens(maps, gh, gw, token):
    """Tokens of K candidate maps (B x C x H x W each) -> K x B x gh x gw x C' (C' = 2C for 'meanstd')."""
    h, w = maps[0].shape[-2:]
    if token == 'meanstd' and h % gh == 0 and w % gw == 0 and not plain_paths():
        return _PatchTokens.apply((gh, gw), *maps)
    return _plain_tokens(maps, gh, gw, token)


def _plain_tokens(maps, gh, gw, token):
    if token == 'meanstd':   # float32 moments under autocast too, as _PatchTokens: E[f^2] - E[f]^2 cancels
        maps = [f.to(torch.promote_types(f.dtype, torch.float32)) for f in maps]
    means = [pool_grid(f, gh, gw) for f in maps]
    if token == 'meanstd':
        means = [torch.cat([m, std_grid(f, m, gh, gw)], 1) for f, m in zip(maps, means)]
    return torch.stack([m.permute(0, 2, 3, 1) for m in means])


def upsample(w, h, wd):
    """Nearest upsampling of patch weights B' x K x gh x gw to B' x K x h x wd (a 1 x 1 grid is left to
    broadcasting). One expand and one copy when the grid divides the map."""
    gh, gw = w.shape[-2:]
    if gh == 1 and gw == 1:
        return w
    if h % gh == 0 and wd % gw == 0:
        b, k = w.shape[:2]
        return w[:, :, :, None, :, None].expand(b, k, gh, h // gh, gw, wd // gw).reshape(b, k, h, wd)
    return F.interpolate(w, size=(h, wd), mode='nearest')


def mix_add(acc, f, w):
    """acc + up(w) * f for f: B x C x H x W and patch weights w: (B or 1) x gh x gw. The weights are
    upsampled to one B x 1 x H x W map (1/C of f's size) and broadcast over channels: every kernel,
    forward and backward, is a plain dense one (a broadcast over a 6-d view of f was 3x slower on CPU)."""
    w = upsample(w.unsqueeze(1), *f.shape[-2:])
    return f * w if acc is None else torch.addcmul(acc, f, w)


def _rows(f, gh):
    """The channels-last map f viewed B x gh x ph x (W C): the ph pixel rows of each grid row (no copy)."""
    b, c, h, w = f.shape
    return f.permute(0, 2, 3, 1).view(b, gh, h // gh, w * c)


def _weight_rows(weights, pw, c):
    """Patch weights B' x K x gh x gw -> B' x K x gh x 1 x (gw pw C): each weight repeated over its patch's pw
    pixels and C channels, one row per grid row, to broadcast against the maps' B x gh x ph x (W C) views."""
    b, k, gh, gw = weights.shape
    return weights.unsqueeze(-1).expand(b, k, gh, gw, pw * c).reshape(b, k, gh, 1, gw * pw * c)


class _MixPatches(torch.autograd.Function):
    """mix_node for channels-last maps on a grid that divides them. Each weight is repeated over its patch's
    pw pixels and C channels once per node (a tensor 1/ph of a map's size), so every product runs over whole
    contiguous (W C) rows of the NHWC memory, as the scalar weights of a static table do; no upsampled weight
    map is made or kept, and the weight gradient sums the ph rows first, then each patch's (pw C) run."""

    @staticmethod
    def forward(ctx, weights, *maps):
        (b, c, h, w), gh = maps[0].shape, weights.shape[2]
        runs = _weight_rows(weights, w // weights.shape[3], c).unbind(1)   # K x (B' x gh x 1 x W C)
        out = torch.empty(maps[0].shape, dtype=torch.result_type(maps[0], weights), device=maps[0].device,
                          memory_format=torch.channels_last)
        acc = _rows(out, gh)
        torch.mul(_rows(maps[0], gh), runs[0], out=acc)             # the same products, in the same order,
        for k in range(1, len(maps)):                               # as f * w then addcmul
            acc.addcmul_(_rows(maps[k], gh), runs[k])
        ctx.save_for_backward(weights, *maps)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():   # create_graph: as _PatchTokens
            return _regrad(_plain_mix, ctx.saved_tensors, grad)
        weights, *maps = ctx.saved_tensors
        (b, c, h, w), (gh, gw) = maps[0].shape, weights.shape[2:]
        g = _rows(grad.contiguous(memory_format=torch.channels_last), gh)
        runs = _weight_rows(weights, w // gw, c).unbind(1)  # made again: kept, they would hold 1/ph of every map
        scratch = (torch.empty(g.shape, dtype=torch.result_type(grad, maps[0]), device=grad.device)
                   if ctx.needs_input_grad[0] else None)         # one product buffer for all K maps
        grad_maps, grad_w = [], []
        for k, f in enumerate(maps):
            if ctx.needs_input_grad[k + 1]:
                gf = torch.empty(f.shape, dtype=f.dtype, device=f.device, memory_format=torch.channels_last)
                torch.mul(g, runs[k], out=_rows(gf, gh))
                grad_maps.append(gf)
            else:
                grad_maps.append(None)
            if ctx.needs_input_grad[0]:
                rows = torch.mul(g, _rows(f, gh), out=scratch).sum(2)                  # B x gh x (W C)
                grad_w.append(rows.view(b, gh, gw, -1).sum(3))                          # B x gh x gw
        if grad_w:
            grad_w = torch.stack(grad_w, 1)
            if weights.shape[0] == 1 and grad_w.shape[0] != 1:             # a static table: summed over the batch
                grad_w = grad_w.sum(0, keepdim=True)
            grad_w = grad_w.to(weights.dtype)
        return (grad_w if ctx.needs_input_grad[0] else None, *grad_maps)


def mix_node(maps, weights):
    """sum_k up(weights[:, k]) * maps[k]: what mix_add does candidate by candidate, for all K candidates of a
    node (weights B' x K x gh x gw, B' = 1 for a static table) at once."""
    h, w = maps[0].shape[-2:]
    gh, gw = weights.shape[-2:]
    if (h % gh == 0 and w % gw == 0 and not plain_paths()
            and all(f.is_contiguous(memory_format=torch.channels_last) for f in maps)):
        return _MixPatches.apply(weights, *maps)
    return _plain_mix(weights, *maps)


def _plain_mix(weights, *maps):
    x = None   # candidate by candidate
    for f, wk in zip(maps, weights.unbind(1)):
        x = mix_add(x, f, wk)
    return x


def _regrad(plain, inputs, grad):
    """The gradient of plain(*inputs) (the plain-op twin of a Function) with its own graph, for a backward asked
    for one: the Functions' hand-written backwards are not differentiable again."""
    # An alias per argument, so that each place gets its own gradient only: a map given twice, or beside a
    # convolution of itself (a state and an op on it), would be handed its whole gradient at each place.
    with torch.enable_grad():
        inputs = [x.view_as(x) if x.requires_grad else x for x in inputs]
        out = plain(*inputs)
    needed = [x for x in inputs if x.requires_grad]
    grads = iter(torch.autograd.grad(out, needed, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if x.requires_grad else None for x in inputs)


# ---------------------------------------------------------------------------------------------
# Search cell

def strip_leading_relu(op):
    """If op begins with a ReLU (DARTS's sep/dil convs, ReLUConvBN, FactorizedReduce, conv 7x1-1x7), replace that
    ReLU by an Identity and return True: the op then wants relu(x) as its input. No parameter changes."""
    if isinstance(op, nn.Sequential) and len(op):
        if isinstance(op[0], nn.ReLU):
            op[0] = Identity()
            return True
        return strip_leading_relu(op[0]) if isinstance(op[0], nn.Sequential) else False
    if isinstance(op, FactorizedReduce) and isinstance(op.relu, nn.ReLU):
        op.relu = Identity()
        return True
    return False


def forward_before_bn(op, x):
    """(op(x), the input of op's final BatchNorm) - the second is op(x) itself for an op without one (identity,
    NB201's pools, 'noise'). A BN without affine parameters makes every conv's batch mean zero, which is also the 'none'
    token; the map before it keeps what the convolution did to the mean (§12's third tie-breaker)."""
    if isinstance(op, nn.BatchNorm2d):
        return op(x), x
    if isinstance(op, nn.Sequential) and len(op):
        modules = list(op)   # into the last module that holds a BN (Conv-BN-ReLU's BN), then on to the output
        last = max((k for k, m in enumerate(modules) if any(isinstance(s, nn.BatchNorm2d) for s in m.modules())),
                   default=len(modules) - 1)
        for module in modules[:last]:
            x = module(x)
        y, before = forward_before_bn(modules[last], x)
        for module in modules[last + 1:]:
            y = module(y)
        return y, before
    if isinstance(op, FactorizedReduce):
        before = op.reduce(x)
        return op.bn(before), before
    y = op(x)
    return y, y


def ends_in_bn(op):
    """Whether op's map is the output of a BatchNorm (every conv here; DARTS's pools, which get one in the search)."""
    if isinstance(op, nn.Sequential) and len(op):
        return ends_in_bn(op[-1])
    return isinstance(op, (nn.BatchNorm2d, FactorizedReduce))


def live_index(live):
    """The candidate indices `live` as a slice when they are a contiguous run (always, in this project's
    spaces): slicing needs no index tensor, which on CUDA is a host-to-device copy that waits for the GPU."""
    live = list(live)
    return slice(live[0], live[-1] + 1) if live == list(range(live[0], live[-1] + 1)) else live


class MixedOp(nn.Module):
    """The candidates of one edge. 'none' is never computed: its output is zero and so is its token.
    Candidates that begin with a ReLU have it removed and take relu(x), which the cell computes once per
    state for all the edges leaving it (same values, fewer ops and saved activations). Likewise a
    parameter-free candidate (a pool, the identity) gives the same map on every edge leaving a state, so the
    cell computes it, and its token, once per state: the edge that leaves the state first does the work (its
    pool BN's running statistics are the ones every such edge would have had; the others' stay unused)."""

    def __init__(self, C, stride, primitives, bn_after_pool):
        super().__init__()
        self.primitives, self.stride = list(primitives), stride
        self.live = [j for j, p in enumerate(self.primitives) if p != 'none']
        self.live_index = live_index(self.live)  # to select the live candidates' columns of a weight table
        ops = []
        for j in self.live:
            op = OPS[self.primitives[j]](C, stride, False)
            if bn_after_pool and 'pool' in self.primitives[j]:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))  # as in DARTS's model_search.py
            ops.append(op)
        self._ops = nn.ModuleList(ops)
        self.wants_relu = [strip_leading_relu(op) for op in self._ops]
        self.uses_relu = any(self.wants_relu)
        # the same function of the input on every edge (an op holding a Noise, as S4's 'noise', draws afresh on each)
        self.pure = [not any(isinstance(m, Noise) for m in op.modules()) and not any(True for _ in op.parameters())
                     for op in self._ops]
        # the identity and NB201's avg-pool pass their input's scale on, where every other candidate ends in a BN
        self.unnormalised = [pure and not ends_in_bn(op) for pure, op in zip(self.pure, self._ops)]

    def forward(self, x, x_relu=None, shared=None, before_bn=False):
        """x_relu: relu(x) if the caller has it (computed here otherwise). shared: a dict kept by the caller for
        the state x, holding the parameter-free candidates' maps by name (None: compute every candidate).
        before_bn: each candidate gives the pair forward_before_bn(op, x) in place of its map."""
        if x_relu is None and self.uses_relu:
            x_relu = F.relu(x)
        run = forward_before_bn if before_bn else (lambda op, inp: op(inp))
        outs = []
        for j, op, wants_relu, pure in zip(self.live, self._ops, self.wants_relu, self.pure):
            if pure and shared is not None:
                name = self.primitives[j]
                if name not in shared:
                    shared[name] = run(op, x)
                outs.append(shared[name])
            else:
                outs.append(run(op, x_relu if wants_relu else x))
        return outs


class NodeAttention(nn.Module):
    """MIDAS's architecture parameters for one node: W_q on the node's concatenated pooled inputs,
    W_k on each candidate's patch token (§3). With key_offset, each of the node's n_keys live candidates also
    has its own key offset o (k = W_k t + o, zero at the start): candidates whose tokens coincide (skip and
    avg-pool, §12) can then still be told apart, by a term that depends on the input through q. With score_bias,
    each also has a scalar b added to its score, the same for every input and patch: a static DARTS alpha per
    node, so the tie can be broken by the gradient that breaks it in DARTS."""

    def __init__(self, n_inputs, C, cfg, n_keys, free_keys=None):
        """free_keys: per key, whether its candidate is parameter-free (--decorrelate-free decorrelates those)."""
        super().__init__()
        token_dim = 2 * C if cfg.token == 'meanstd' else C
        self.cfg, self.n_inputs = cfg, n_inputs
        free_mask = None
        if cfg.decorrelate_free and not cfg.decorrelate:
            if free_keys is None or len(free_keys) != n_keys:
                raise ValueError('--decorrelate-free needs to know which of the keys are parameter-free')
            free_mask = torch.tensor(free_keys, dtype=torch.bool)
        # a buffer, so that it follows .to(device) and replicas; not saved, so checkpoints stay as they were
        self.register_buffer('free_mask', free_mask, persistent=False)
        self.w_q = nn.Linear(n_inputs * C, cfg.attn_dim, bias=False)
        self.w_k = nn.Linear(token_dim, cfg.attn_dim, bias=False)
        self.key_offset = nn.Parameter(torch.zeros(n_keys, cfg.attn_dim)) if cfg.key_offset else None
        self.score_bias = nn.Parameter(torch.zeros(n_keys, 1, 1, 1)) if cfg.score_bias else None

    @property
    def decorrelated_keys(self):
        """The keys whose scores lose the query-key covariance: None (none), True (all) or the K bool mask.
        Read from the buffer at each call: an attribute holding it would stay behind on the CPU after .to(device),
        which replaces buffers."""
        return True if self.cfg.decorrelate else self.free_mask

    def forward(self, pooled_inputs, tokens):
        """pooled_inputs: B x (n_in C) x gh x gw; tokens: K x B x gh x gw x C', edge-major (K = E L) -> scores
        K x B x gh x gw."""
        z = pooled_inputs.permute(0, 2, 3, 1)                                    # B gh gw nC
        if self.cfg.token_norm:
            z = F.layer_norm(z, z.shape[-1:])
        # <W_q z, W_k t> = <W_k^T W_q z, t>: the key projection is applied to the query once rather than to
        # all K candidate tokens (the same scores, a K-times smaller matrix product)
        q = self.w_q(z)                                                          # B gh gw d
        qk = q @ self.w_k.weight                                                 # B gh gw C'
        if self.cfg.token_norm and self.cfg.edge_norm:
            scores = self.edge_normalized_scores(tokens, qk)
        else:
            if self.cfg.token_norm:
                tokens = F.layer_norm(tokens, tokens.shape[-1:])
            scores = (tokens * qk).sum(-1)                                       # K B gh gw
            if self.decorrelated_keys is not None:
                scores = decorrelated(scores, tokens.mean((1, 2, 3)), qk, self.decorrelated_keys)
        if self.key_offset is not None:
            scores = scores + (q @ self.key_offset.t()).permute(3, 0, 1, 2)
        if self.score_bias is not None:   # times sqrt(d): b is in logit units, as DARTS's alpha
            scores = scores + self.score_bias * math.sqrt(self.cfg.attn_dim)
        return scores / (math.sqrt(self.cfg.attn_dim) * self.cfg.tau)

    def edge_normalized_scores(self, tokens, qk):
        """<qk, t> with the tokens of each edge's L candidates layer-normalised together (one mean and variance
        over the L candidates and C' channels, per sample and patch). A token normalised alone loses its scale,
        and scale is what tells skip from avg-pool (§12): pooling shrinks every channel's per-patch spread by
        about the same factor, and LayerNorm(k t) = LayerNorm(t). Normalised per edge, a candidate keeps its
        scale relative to the others it competes with, and the scores keep LayerNorm's sharpness."""
        k, b, gh, gw, c = tokens.shape
        edges = tokens.view(self.n_inputs, -1, b, gh, gw, c).permute(0, 2, 3, 4, 1, 5)     # E B gh gw L C'
        edges = edges.reshape(self.n_inputs, b, gh, gw, -1)                                  # E B gh gw (L C')
        edges = F.layer_norm(edges, edges.shape[-1:])
        scores = (edges.view(self.n_inputs, b, gh, gw, -1, c) * qk.unsqueeze(-2)).sum(-1)  # E B gh gw L
        scores = scores.permute(0, 4, 1, 2, 3).reshape(k, b, gh, gw)
        if self.decorrelated_keys is not None:
            scores = decorrelated(scores, edges.mean((1, 2, 3)).view(k, c), qk, self.decorrelated_keys)
        return scores


def decorrelated(scores, mean_keys, qk, keys=True):
    """--decorrelate: scores K x B x gh x gw whose mean over the batch and the patches, per candidate, is the
    batch's mean query (qk: B x gh x gw x C') against the candidate's mean key (mean_keys: K x C', the keys as
    the scores read them), each input's and patch's deviation from it kept. A plain score's mean is the mean
    query against the mean key plus the covariance of query and key over images and patches. The identity's key
    is made of its input, the very thing the query is made of (avg-pool's of a blur of it), so for them the
    covariance is a self-match: a W_q and W_k whose product grows along the input's directions raise both for
    every image (RESULTS.md, twenty-fourth round). With one image and one patch there is no covariance to tell
    apart and the scores are the plain ones. The means are the batch's in eval mode too, as --token-bn's statistics
    are: an image's weights depend on the batch it is read in (§8's decode reads batches of 256). keys: True, or a
    K bool mask of the candidates to decorrelate (--decorrelate-free), the others' scores left as they are."""
    matched = (mean_keys * qk.mean((0, 1, 2))).sum(-1)                                          # K
    out = scores - scores.mean((1, 2, 3), keepdim=True) + matched.view(-1, 1, 1, 1)
    return out if keys is True else torch.where(keys.view(-1, 1, 1, 1), out, scores)


_PAIR_TABLES = {}


def clip_weights(w):
    """MS-DARTS's clip of a sampled point (SDARTS's Network.clip): each edge's weights (dim 1, 'none' too) clamped
    to [0, 1] and divided by their sum; an edge clamped to all zeros puts 1 on its largest weight."""
    c = w.clamp(0, 1)
    total = c.sum(1, keepdim=True)
    empty = total == 0
    c = torch.where(empty, F.one_hot(w.argmax(1), w.shape[1]).movedim(-1, 1).to(c.dtype), c)
    return c / torch.where(empty, torch.ones_like(total), total)


def _pair_tables(n_edges, device, dtype):
    """For node_pairs(n_edges): the index of each pair's first and second edge, and the E x P membership
    matrix, made once per device and dtype (rebuilding them every node costs dozens of tiny kernels, and on
    CUDA host-to-device copies that wait for the GPU)."""
    key = (n_edges, str(device), dtype)
    if key not in _PAIR_TABLES:
        pairs = node_pairs(n_edges)
        with torch.inference_mode(False):   # kept for good: made under inference mode, autograd could never save them
            membership = torch.zeros(n_edges, len(pairs), dtype=dtype)
            for p, (i, j) in enumerate(pairs):
                membership[i, p] = membership[j, p] = 1.0
            _PAIR_TABLES[key] = (torch.tensor([i for i, _ in pairs], device=device),
                                 torch.tensor([j for _, j in pairs], device=device), membership.to(device))
    return _PAIR_TABLES[key]


def edge_weights(scores, live, topology, cut=None):
    """Softmax over each edge's candidates, then (topology) the pair softmax of §5, for all the edges of a node at
    once. scores: E x J x B' x gh x gw (B' = 1 for a static table); live: the columns of the non-'none' candidates;
    cut: E booleans, True for an edge taken out of every pair (its logit -inf), or None.
    -> (w E x J x B' x gh x gw, gamma E x B' x gh x gw or None, pi P x B' x gh x gw or None)"""
    w = scores.softmax(1)
    if not topology or scores.shape[0] < 2:
        return w, None, None
    logits = scores[:, live].logsumexp(1)                                                       # E B gh gw
    if cut is not None:
        logits = logits.masked_fill(cut.view(-1, 1, 1, 1), -math.inf)
    first, second, membership = _pair_tables(scores.shape[0], logits.device, logits.dtype)
    pi = (logits.index_select(0, first) + logits.index_select(0, second)).softmax(0)           # P B gh gw
    # a product and a sum, not einsum: autocast would run einsum's matmul in bf16, and gamma, which sums to 2,
    # would lose its third digit (pi is float32: softmax autocasts up)
    gamma = (membership.view(*membership.shape, 1, 1, 1) * pi).sum(1)                         # E B gh gw
    return w, gamma, pi


class SearchCell(nn.Module):
    """One cell of a search supernet. kind 'darts': inputs s0, s1 (preprocessed), 4 nodes, output the
    concat of the nodes; kind 'nb201': one input, 3 nodes taking every predecessor, output the last."""

    def __init__(self, kind, edge_ops, C_prev_prev, C_prev, C, reduction, reduction_prev, cfg):
        super().__init__()
        layouts = {(len(ops), tuple(p == 'none' for p in ops)) for ops in edge_ops}
        assert len(layouts) == 1, ("a cell's edges are scored as one tensor (and DARTS's alpha is one table): "
                                   "every edge needs the same number of candidates, 'none' in the same places")
        self.kind, self.reduction, self.cfg = kind, reduction, cfg
        self.topology = cfg.topology and kind == 'darts'  # NB201 nodes take every predecessor (§5)
        if kind == 'darts':
            self.preprocess0 = (FactorizedReduce(C_prev_prev, C, affine=False) if reduction_prev
                                else ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False))
            self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        self.nodes = node_inputs(kind)
        self._ops = nn.ModuleList()
        free_keys = []   # per node, whether each of its keys is a parameter-free candidate (S1's edges differ)
        for _, inputs in self.nodes:
            for i in inputs:
                stride = 2 if reduction and i < 2 and kind == 'darts' else 1
                self._ops.append(MixedOp(C, stride, edge_ops[len(self._ops)], bn_after_pool=kind == 'darts'))
            free_keys.append([pure for op in self._ops[-len(inputs):] for pure in op.pure])
        self.attention = nn.ModuleList(
            [NodeAttention(len(inputs), C, cfg, len(free), free) for (_, inputs), free in zip(self.nodes, free_keys)]
        ) if cfg.method == 'midas' else None
        self.live = self._ops[0].live_index  # the same on every edge: one tensor per node
        self.before_bn = cfg.token_before_bn and cfg.method == 'midas'

    def forward(self, inputs, alpha=None, recorder=None, offset=None, detach_mixing=False, aux_beta=None,
                removed=None, clip=False):
        """offset: an E x J table added to the mixing weights (mean-shift sampling), or None; clip: the weights
        so moved are clipped to MS-DARTS's simplex (clip_weights), as it evaluates its sampled points. detach_mixing:
        the mixing weights are made without a graph, constants to the backward (as alpha is to DARTS's weights).
        aux_beta: the weight of the auxiliary skips (DARTS-), or None. removed: (E x J candidates, E edges), True
        where a candidate or a whole edge is taken out of the supernet (perturbation selection), or None."""
        if self.kind == 'darts':
            states = [self.preprocess0(inputs[0]), self.preprocess1(inputs[1])]
        else:
            states = [inputs[0]]
        pooled = {}  # every node of a cell has the same resolution: pool each state once
        relu = {}    # relu(state), computed once for all the candidates that begin with a ReLU
        shared = [{} for _ in range(len(states) + len(self.nodes))]  # per state: its parameter-free maps
        tokens = {}  # (state, candidate) -> token of a parameter-free candidate's map
        e0 = 0
        for n, (node, srcs) in enumerate(self.nodes):
            edges = self._ops[e0:e0 + len(srcs)]
            for op, i in zip(edges, srcs):
                if op.uses_relu and i not in relu:
                    relu[i] = F.relu(states[i])
            outs = [op(states[i], relu.get(i), shared[i], self.before_bn) for op, i in zip(edges, srcs)]
            maps = [f for edge_outs in outs for f in edge_outs]
            if self.before_bn:   # (map, the map its token is read from) pairs
                maps, token_maps = [f for f, _ in maps], [t for _, t in maps]
            else:
                token_maps = maps
            cut = None
            with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_mixing):
                scores = self._scores(n, srcs, states, edges, token_maps, pooled, tokens, alpha, e0)  # E J B' gh gw
                if removed is not None:  # a removed candidate's score is -inf: its edge's softmax renormalises
                    ops, cut = (r[e0:e0 + len(srcs)] for r in removed)
                    scores = scores.masked_fill(ops.view(*ops.shape, 1, 1, 1), -math.inf)
                w, gamma, pi = edge_weights(scores, self.live, self.topology, cut)
            if offset is not None:
                w = w + offset[e0:e0 + len(srcs)].view(*w.shape[:2], 1, 1, 1)
                if clip:
                    w = clip_weights(w)
            if recorder is not None:
                recorder(self, n, w.transpose(1, 2).unbind(0), gamma, pi)
            # weight of candidate j on edge e: w[e, j], times gamma[e] with the topology (§4-5)
            weights = w[:, self.live] if gamma is None else w[:, self.live] * gamma.unsqueeze(1)  # E L B' gh gw
            if cut is not None:   # a removed edge adds nothing to its node (with the topology: gamma is 0 already)
                weights = weights.masked_fill(cut.view(-1, 1, 1, 1, 1), 0.0)
            node = mix_node(maps, weights.flatten(0, 1).transpose(0, 1))
            if aux_beta is not None:   # a reduction cell's edges from its inputs have stride 2: no identity there
                node = node + aux_beta * sum(states[i] for op, i in zip(edges, srcs) if op.stride == 1)
            states.append(node)
            e0 += len(srcs)
        if self.kind == 'darts':
            return torch.cat(states[2:], dim=1)
        return states[-1]

    def _scores(self, n, srcs, states, edges, maps, pooled, tokens, alpha, e0):
        """E x J x B' x gh x gw scores of the node's edges, 'none' scored 0 (its token and so its key are 0).
        maps: the candidates' maps the tokens are read from."""
        if alpha is not None:  # static DARTS table: one row per edge, broadcast over batch and patches
            return alpha[e0:e0 + len(edges)].view(len(edges), -1, 1, 1, 1)
        h, w = maps[0].shape[-2:]
        gh, gw = grid_size(h, w, self.cfg.patch)
        for i in srcs:
            if i not in pooled:
                pooled[i] = pool_grid(states[i], gh, gw)
        keys = [(i, op.primitives[j]) if pure else None
                for op, i in zip(edges, srcs) for j, pure in zip(op.live, op.pure)]
        standardise = None
        if self.cfg.token_bn:   # the source state of each candidate that needs it, else None
            standardise = [states[i] if raw else None
                           for op, i in zip(edges, srcs) for raw in op.unnormalised]
        t = self._tokens(maps, keys, tokens, gh, gw, standardise)
        live = self.attention[n](torch.cat([pooled[i] for i in srcs], 1), t)    # K B gh gw, K = E L
        live = live.view(len(edges), -1, *live.shape[1:])                         # E L B gh gw
        if live.shape[1] == len(edges[0].primitives):
            return live
        scores = live.new_zeros(len(edges), len(edges[0].primitives), *live.shape[2:])
        scores[:, self.live] = live
        return scores

    def _tokens(self, maps, keys, cache, gh, gw, standardise=None):
        """The tokens of a node's K candidate maps, K x B x gh x gw x C' (NodeAttention normalises them). A
        parameter-free candidate's map (key not None) is the same on every edge leaving its state, and so is its
        token: made once, kept in cache for the later nodes of the cell. standardise: per candidate, the state
        whose batch statistics standardise its token (--token-bn), or None."""
        todo = [k for k, key in enumerate(keys) if key not in cache]
        made = patch_tokens([maps[k] for k in todo], gh, gw, self.cfg.token) if todo else None
        if standardise is not None and any(standardise[k] is not None for k in todo):
            made = standardised_tokens(made, [standardise[k] for k in todo], self.cfg.token)
        # unbind, not indexing: one backward op for all of them, where each index would zero-fill K tokens
        new = dict(zip(todo, made.unbind(0) if todo else ()))
        cache.update((keys[k], new[k]) for k in todo if keys[k] is not None)
        if len(todo) == len(maps):
            return made
        return torch.stack([new[k] if k in new else cache[key] for k, key in enumerate(keys)])


def standardised_tokens(tokens, states, token):
    """--token-bn: K tokens, K x B x gh x gw x C', each whose state is given read as if its map had passed a BN
    without affine parameters, as the convolutions' maps have: its patch means less the state's per-channel batch
    mean, means and spreads over the state's per-channel batch std. The identity's and avg-pool's maps carry
    their input's scale, which grows with depth (a node sums its edges, a stage its cells), where a conv's BN
    resets it to 1; with edge-normalised keys (--edge-norm) the larger token takes the larger score. Both are
    divided by the same state's std, so avg-pool keeps the smaller spread that tells it from skip. In eval mode too
    the statistics are the batch's (no running estimates are kept): §8's decode reads batches of 256 images, and
    running estimates would lag behind a supernet whose architecture is still moving."""
    c = tokens.shape[-1] // 2 if token == 'meanstd' else tokens.shape[-1]
    shift, scale, done = [], [], {}
    for t, state in zip(tokens, states):
        if state is None:
            shift.append(t.new_zeros(c)), scale.append(t.new_ones(c))
            continue
        if id(state) not in done:   # mean and std per channel over batch and pixels, in float32 at least
            var, mean = torch.var_mean(state.to(torch.promote_types(state.dtype, torch.float32)), dim=(0, 2, 3),
                                       correction=0)
            done[id(state)] = mean, (var + 1e-5).sqrt()   # BatchNorm2d's eps
        mean, std = done[id(state)]
        shift.append(mean), scale.append(std)
    shift, scale = torch.stack(shift), torch.stack(scale)                      # K x C
    if token == 'meanstd':
        shift, scale = torch.cat([shift, torch.zeros_like(shift)], 1), torch.cat([scale, scale], 1)
    return (tokens - shift[:, None, None, None]) / scale[:, None, None, None]


# ---------------------------------------------------------------------------------------------
# Search networks

class ResNetBasicblock(nn.Module):
    """NAS-Bench-201's stride-2 residual block between stages."""

    def __init__(self, inplanes, planes, stride, affine=True):
        super().__init__()
        self.conv_a = ReLUConvBN(inplanes, planes, 3, stride, 1, affine)
        self.conv_b = ReLUConvBN(planes, planes, 3, 1, 1, affine)
        if stride == 2:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, 2, 0),
                                            nn.Conv2d(inplanes, planes, 1, 1, 0, bias=False))
        elif inplanes != planes:
            self.downsample = ReLUConvBN(inplanes, planes, 1, 1, 0, affine)
        else:
            self.downsample = None

    def forward(self, x):
        out = self.conv_b(self.conv_a(x))
        return out + (x if self.downsample is None else self.downsample(x))


def aux_skip_weight(epoch, epochs):
    """The auxiliary skips' beta (DARTS-) in epoch `epoch` (from 0) of a search of `epochs`: 1 in the first, 0 in
    the last (1 in a one-epoch search), linear between; search.py's final decode reads the supernet without them."""
    return 1.0 - epoch / max(epochs - 1, 1)


class SearchNetwork(nn.Module):
    """The supernet of any space. DARTS-style spaces: DARTS's search Network (stem 3C, `layers` cells,
    reductions at 1/3 and 2/3). NB201: the NAS-Bench-201 macro network (three stages of `cells` cells
    at C, 2C, 4C joined by residual blocks). Any memory layout gives the same values; the hand-fused token and
    mixing kernels run on channels-last maps (`.to(memory_format=torch.channels_last)` for the network and its
    input, as search.py does), and a network in NCHW takes plain ops."""

    def __init__(self, space, C=16, num_classes=10, layers=8, cells=5, cfg=ArchConfig(), stem_multiplier=3):
        super().__init__()
        self.space_name, self.space, self.cfg = space, get_space(space), cfg
        self.kind = self.space['kind']
        self.cells = nn.ModuleList()
        if self.kind == 'darts':
            C_curr = stem_multiplier * C
            self.stem = nn.Sequential(nn.Conv2d(3, C_curr, 3, padding=1, bias=False), nn.BatchNorm2d(C_curr))
            C_pp, C_p, C_curr = C_curr, C_curr, C
            reduction_prev = False
            for i in range(layers):
                reduction = i in (layers // 3, 2 * layers // 3)
                if reduction:
                    C_curr *= 2
                cell_type = 'reduce' if reduction else 'normal'
                self.cells.append(SearchCell('darts', self.space[cell_type], C_pp, C_p, C_curr, reduction,
                                             reduction_prev, cfg))
                reduction_prev = reduction
                C_pp, C_p = C_p, 4 * C_curr
            self.lastact = nn.Identity()
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
            C_p = C
            for stage in range(3):
                C_curr = C * 2 ** stage
                if stage > 0:
                    self.cells.append(ResNetBasicblock(C_p, C_curr, 2))
                for _ in range(cells):
                    self.cells.append(SearchCell('nb201', self.space['normal'], None, C_curr, C_curr,
                                                 False, False, cfg))
                C_p = C_curr
            self.lastact = nn.Sequential(nn.BatchNorm2d(C_p), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self.feature_channels, self.feature_stride = C_p, 4  # the last map is 1/4 of the input: two reductions
        self.mix_offset = None  # {cell type: E x J}, set only while mean-shift sampling runs
        self.mix_clip = False   # True while it evaluates its points: the moved weights clipped (clip_weights)
        self.removed = None     # {cell type: (E x J, E) booleans}, set only while perturbation selection runs
        # DARTS- (Chu et al. 2021; search.py --aux-skip): every node also gets aux_beta times each of its stride-1
        # inputs, outside the searched mixture, so that a skip candidate is no longer the supernet's only gradient
        # highway; search.py decays aux_beta to 0 over the search. A buffer: torch.compile reads a new value without
        # recompiling.
        self.aux_skip = False
        self.register_buffer('aux_beta', torch.zeros(()), persistent=False)
        if cfg.method == 'midas' and cfg.share_attention:
            # One attention per node for all the cells of a stage and type (cells of equal width: their W_q, W_k
            # have the same shapes), where §3 gives each cell its own. Each cell then still weighs its own inputs,
            # but by one rule: §8 averages the cells' weights, and the cells of a deep supernet, each free to decide
            # alone, disagree until their average is near uniform (RESULTS.md, third round).
            first = {}
            for cell in self.search_cells():
                key = (self.cell_type(cell), tuple(p.shape for p in cell.attention.parameters()))
                cell.attention = first.setdefault(key, cell.attention)
        if cfg.method == 'darts':  # one table per cell type, shared by all cells of that type (§6); DARTS's 1e-3 init
            self.alphas = nn.ParameterDict({
                t: nn.Parameter(1e-3 * torch.randn(len(self.space[t]), len(self.space[t][0])))
                for t in cell_types(self.kind)})
        else:
            self.alphas = None

    def cell_type(self, cell):
        return 'reduce' if cell.reduction else 'normal'

    def forward(self, x, recorder=None, features=False, detach_mixing=False):
        """-> logits, or (logits, the last feature map) with features=True (masked image modelling).
        detach_mixing: no gradient flows through the mixing weights (search.py's --detach-mixing)."""
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if isinstance(cell, SearchCell):
                cell_type = self.cell_type(cell)
                alpha = self.alphas[cell_type] if self.alphas is not None else None
                offset = self.mix_offset[cell_type] if self.mix_offset is not None else None
                removed = self.removed[cell_type] if self.removed is not None else None
                s0, s1 = s1, cell([s0, s1] if self.kind == 'darts' else [s1], alpha=alpha, recorder=recorder,
                                  offset=offset, clip=self.mix_clip, detach_mixing=detach_mixing,
                                  aux_beta=self.aux_beta if self.aux_skip else None, removed=removed)
            else:
                s0, s1 = s1, cell(s1)
        fmap = self.lastact(s1)
        logits = self.classifier(self.global_pooling(fmap).flatten(1))
        return (logits, fmap) if features else logits

    def arch_parameters(self):
        if self.alphas is not None:
            return list(self.alphas.values())
        return list(dict.fromkeys(p for cell in self.search_cells() for p in cell.attention.parameters()))

    def weight_parameters(self):
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def search_cells(self):
        return [c for c in self.cells if isinstance(c, SearchCell)]


class MIMDecoder(nn.Module):
    """Masked image modelling's light decoder (alpha-DARTS, METHOD.md §11): a 1x1 convolution to
    3 * scale^2 channels and a pixel shuffle turn the last feature map back into an image."""

    def __init__(self, C_in, scale):
        super().__init__()
        self.conv = nn.Conv2d(C_in, 3 * scale * scale, 1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, fmap):
        return self.shuffle(self.conv(fmap))


def mask_patches(x, ratio, patch, generator=None):
    """Zero round(ratio * n) random patch x patch squares of each image (zero is the mean colour of a
    normalised image). -> (masked images, mask B x 1 x H x W with 1 where masked)."""
    b, _, h, w = x.shape
    gh, gw = h // patch, w // patch
    n = gh * gw
    k = int(round(ratio * n))
    order = torch.rand(b, n, generator=generator).argsort(1)
    mask = torch.zeros(b, n)
    mask.scatter_(1, order[:, :k], 1.0)
    if x.device.type == 'cuda':   # pinned, the copy does not wait for the GPU; of the patch grid, not the pixels
        mask = mask.pin_memory()
    mask = mask.to(x.device, x.dtype, non_blocking=True)
    mask = mask.view(b, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    mask = F.pad(mask, (0, w - gw * patch, 0, h - gh * patch))
    return x * (1 - mask), mask


def mim_loss(recon, x, mask):
    """Mean squared error over the masked pixels only; 0 when nothing is masked."""
    return ((recon - x) ** 2 * mask).sum() / (3 * mask.sum()).clamp_min(1)


# ---------------------------------------------------------------------------------------------
# Averaged weights for decoding (§8)

class WeightAverager:
    """A recorder for SearchNetwork.forward: sums w, gamma and pi over samples and patches, per cell
    type, node and edge. Average over samples and patches first, then over the cells of one type."""

    def __init__(self, model):
        self.model = model
        self.sums = {}

    def __call__(self, cell, n, w, gamma, pi):
        """w: per edge, B' x J x gh x gw (B' = 1 for a static table, which counts once per batch)."""
        key = (self.model.cell_type(cell), id(cell), n)
        batch = w[0].shape[0]
        means = {'w': torch.stack([x.detach().float().mean((0, 2, 3)) for x in w])}   # E x J
        if gamma is not None:
            means['gamma'] = gamma.detach().float().mean((1, 2, 3))
            means['pi'] = pi.detach().float().mean((1, 2, 3))
        acc = self.sums.setdefault(key, {'count': 0})
        for k, v in means.items():
            acc[k] = v * batch if k not in acc else acc[k] + v * batch
        acc['count'] += batch

    def result(self):
        """-> {cell_type: {'weights': [[w per op] per edge], 'gamma': [per edge] or None,
        'pairs': [[pi per pair] per node] or None}} as plain floats."""
        per_type = {}
        for (cell_type, _, n), acc in self.sums.items():
            per_type.setdefault(cell_type, {}).setdefault(n, []).append(acc)
        out = {}
        for cell_type, nodes in per_type.items():
            weights, gamma, pairs = [], [], []
            for n in sorted(nodes):
                accs = nodes[n]
                cell_mean = lambda k: [a[k] / a['count'] for a in accs]   # per cell, over its samples and patches
                ws = cell_mean('w')   # E x J per cell; then each edge's mean over the cells
                weights += [torch.stack([c[e] for c in ws]).mean(0).tolist() for e in range(len(ws[0]))]
                if 'gamma' in accs[0]:
                    gamma += torch.stack(cell_mean('gamma')).mean(0).tolist()
                    pairs.append(torch.stack(cell_mean('pi')).mean(0).tolist())
            out[cell_type] = {'weights': weights, 'gamma': gamma or None, 'pairs': pairs or None}
        return out


@torch.no_grad()
def average_weights(model, batches):
    """Run the supernet in eval mode over `batches` (an iterable of (x, y)) and average its mixing
    weights (§8)."""
    was_training = model.training
    model.eval()
    averager = WeightAverager(model)
    for x, _ in batches:
        model(x, recorder=averager)
    model.train(was_training)
    return averager.result()


# ---------------------------------------------------------------------------------------------
# Evaluation (retraining) networks, METHOD.md §10.
#
# DARTS-family networks with the semantics of the original DARTS `cnn/model.py` (NetworkCIFAR,
# NetworkImageNet, their cells and auxiliary heads), and the NAS-Bench-201 evaluation network
# (the benchmark's TinyNetwork: InferCell stages joined by ResNet basic blocks). Parameter counts
# equal those of the original implementations (checked side by side). Every network's forward
# returns (logits, logits_aux), logits_aux None when there is no auxiliary head or in eval mode.
# ---------------------------------------------------------------------------------------------

def drop_path(x, drop_prob):
    """Drop whole samples of an op's output with probability drop_prob, scaling the survivors by
    1/keep_prob (DARTS utils.drop_path, out of place so autograd never sees an in-place edit)."""
    if drop_prob > 0.:
        keep_prob = 1. - drop_prob
        # rand < keep rather than bernoulli_(keep): torch.compile would recompile for every new keep.
        mask = (torch.rand(x.size(0), 1, 1, 1, device=x.device) < keep_prob).to(x.dtype)
        x = x * mask.div_(keep_prob)   # the B x 1 x 1 x 1 mask scaled, not the map: one pass over x, not two
    return x


class Cell(nn.Module):
    """A fixed (discrete) DARTS cell: two preprocessed inputs, len(ops)//2 nodes each summing two
    ops, output the channel concat of the genotype's concat states. Works for any node count
    (NASNet/AmoebaNet have 5) and for any op OPS knows."""

    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)

        edges = genotype.reduce if reduction else genotype.normal
        concat = genotype.reduce_concat if reduction else genotype.normal_concat
        if not edges or len(edges) % 2:
            raise ValueError('a cell needs an even, non-zero number of (op, input) pairs')
        op_names, indices = zip(*edges)
        self._steps = len(op_names) // 2
        self._indices = [int(i) for i in indices]
        self._concat = [int(i) for i in concat]
        self.multiplier = len(self._concat)
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, self._indices):
            stride = 2 if reduction and index < 2 else 1  # only the cell inputs are at full resolution
            self._ops.append(OPS[name](C, stride, True))

    def forward(self, s0, s1, drop_prob=0.):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self._steps):
            node = 0
            for e in (2 * i, 2 * i + 1):
                op = self._ops[e]
                h = op(states[self._indices[e]])
                if self.training and drop_prob > 0. and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on the 8x8 maps after the second reduction (CIFAR, 32x32 input)."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),  # 8x8 -> 2x2
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),  # -> 1x1
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.flatten(1))


class AuxiliaryHeadImageNet(nn.Module):
    """Auxiliary classifier after the second reduction of NetworkImageNet. The original DARTS code
    documents a 14x14 input, but at 224x224 the maps there are 7x7 (-> 2x2 -> 1x1). As in the
    original, there is no BatchNorm after the 768-channel conv (the paper's models lack it)."""

    def __init__(self, C, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.flatten(1))


def _stack_cells(net, genotype, C, layers, C_prev_prev, C_prev, reduction_prev):
    """Build net.cells: reductions (channels doubled) at layers//3 and 2*layers//3. -> (channels
    of the last cell, channels at the auxiliary position 2*layers//3)."""
    net.cells = nn.ModuleList()
    C_curr, C_aux = C, None
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        if reduction:
            C_curr *= 2
        cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
        net.cells.append(cell)
        reduction_prev = reduction
        C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
        if i == 2 * layers // 3:
            C_aux = C_prev
    return C_prev, C_aux


class NetworkCIFAR(nn.Module):
    """The DARTS CIFAR evaluation network (20 cells, 36 channels in the paper). Set
    `drop_path_prob` from the training loop; forward -> (logits, logits_aux or None)."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, drop_path_prob=0.0):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = drop_path_prob
        stem_multiplier = 3
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(3, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        C_prev, C_aux = _stack_cells(self, genotype, C, layers, C_stem, C_stem, False)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(C_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


class NetworkImageNet(nn.Module):
    """The DARTS mobile-setting ImageNet network (14 cells, 48 channels; 224x224 input, three
    stride-2 stem convs). forward -> (logits, logits_aux or None)."""

    def __init__(self, C, num_classes, layers, auxiliary, genotype, drop_path_prob=0.0):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.drop_path_prob = drop_path_prob
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),  # stem0's output is also the first cell's s0: leave it intact
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        # reduction_prev=True: s0 (stem0) has twice the resolution of s1 (stem1)
        C_prev, C_aux = _stack_cells(self, genotype, C, layers, C, C, True)
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_aux, num_classes)
        self.global_pooling = nn.AvgPool2d(7)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        logits_aux = None
        s0 = self.stem0(x)
        s1 = self.stem1(s0)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        return self.classifier(out.flatten(1)), logits_aux


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201 evaluation network

class InferCell(nn.Module):
    """A fixed NAS-Bench-201 cell: node k (1..3) = sum over j<k of op_jk(node j); output = node 3.
    'none' edges are kept (as zeros), as in the benchmark's code; a node whose inputs are all
    'none' is zero."""

    def __init__(self, arch, C):
        super().__init__()
        ops = nb201_parse(arch) if isinstance(arch, str) else list(arch)
        self.arch = arch
        self.layers = nn.ModuleList([OPS[name](C, 1, True) for name in ops])
        self._inputs, k, e = [], 1, 0  # per node: [(edge index, input node)]
        while e < len(ops):
            self._inputs.append([(e + j, j) for j in range(k)])
            e, k = e + k, k + 1
        self.in_dim = self.out_dim = C

    def forward(self, x):
        nodes = [x]
        for inputs in self._inputs:
            nodes.append(sum(self.layers[e](nodes[j]) for e, j in inputs))
        return nodes[-1]


class NB201Network(nn.Module):
    """NAS-Bench-201's TinyNetwork: stem, three stages of N InferCells at C, 2C, 4C channels joined
    by stride-2 ResNet blocks, BN-ReLU, global pooling, linear. forward -> (logits, None), the same
    shape as the DARTS networks (`drop_path_prob` exists for a uniform training loop, unused)."""

    def __init__(self, C, N, arch, num_classes):
        super().__init__()
        self.arch = arch
        self.drop_path_prob = 0.0
        self.stem = nn.Sequential(nn.Conv2d(3, C, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.cells = nn.ModuleList()
        C_prev = C
        for stage, C_curr in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                self.cells.append(ResNetBasicblock(C_prev, C_curr, 2))
            for _ in range(N):
                self.cells.append(InferCell(arch, C_curr))
            C_prev = C_curr
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x):
        feature = self.stem(x)
        for cell in self.cells:
            feature = cell(feature)
        out = self.global_pooling(self.lastact(feature))
        return self.classifier(out.flatten(1)), None


def count_parameters(model, exclude_auxiliary=True):
    """Number of parameters; like DARTS, those of the auxiliary head (names containing
    'auxiliary') are left out unless exclude_auxiliary=False."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (exclude_auxiliary and 'auxiliary' in name))
