"""Search spaces as data, genotypes, decoding rules and NAS-Bench-201 arch strings.

A space is a dict: its kind ('darts' cells with two inputs and 4 nodes, or 'nb201' cells with one
input and 3 nodes) and, per cell type, the candidate ops of every edge in node-major order
(node 2 <- 0, 2 <- 1, 3 <- 0, 3 <- 1, 3 <- 2, 4 <- 0, ...). Imports nothing of the project.
"""
import ast
import itertools
import json
import os
from collections import namedtuple

Genotype = namedtuple('Genotype', 'normal normal_concat reduce reduce_concat')

PRIMITIVES = [
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
]
NB201_PRIMITIVES = ['none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3']
# Every op name ops.OPS builds (published genotypes use a few outside PRIMITIVES).
ALL_OPS = PRIMITIVES + ['noise', 'sep_conv_7x7', 'conv_7x1_1x7', 'nor_conv_1x1', 'nor_conv_3x3']

STEPS = 4           # intermediate nodes of a DARTS cell
NB201_NODES = 3     # intermediate nodes of a NAS-Bench-201 cell (node 0 is the input)
DARTS_EDGES = sum(k + 2 for k in range(STEPS))   # 14
NB201_EDGES = sum(k + 1 for k in range(NB201_NODES))  # 6

# RDARTS S1 (Zela et al. 2020): a different pair of candidates on every edge.
_S1_NORMAL = [
    ['skip_connect', 'dil_conv_3x3'], ['skip_connect', 'dil_conv_5x5'], ['skip_connect', 'dil_conv_5x5'],
    ['skip_connect', 'sep_conv_3x3'], ['skip_connect', 'dil_conv_3x3'], ['max_pool_3x3', 'skip_connect'],
    ['skip_connect', 'sep_conv_3x3'], ['skip_connect', 'sep_conv_3x3'], ['skip_connect', 'dil_conv_3x3'],
    ['skip_connect', 'sep_conv_3x3'], ['max_pool_3x3', 'skip_connect'], ['skip_connect', 'dil_conv_3x3'],
    ['dil_conv_3x3', 'dil_conv_5x5'], ['dil_conv_3x3', 'dil_conv_5x5'],
]
_S1_REDUCE = [
    ['max_pool_3x3', 'avg_pool_3x3'], ['max_pool_3x3', 'dil_conv_3x3'], ['max_pool_3x3', 'avg_pool_3x3'],
    ['max_pool_3x3', 'avg_pool_3x3'], ['skip_connect', 'dil_conv_5x5'], ['max_pool_3x3', 'avg_pool_3x3'],
    ['max_pool_3x3', 'sep_conv_3x3'], ['skip_connect', 'dil_conv_3x3'], ['skip_connect', 'dil_conv_5x5'],
    ['max_pool_3x3', 'avg_pool_3x3'], ['max_pool_3x3', 'avg_pool_3x3'], ['skip_connect', 'dil_conv_5x5'],
    ['skip_connect', 'dil_conv_5x5'], ['skip_connect', 'dil_conv_5x5'],
]


def _same(ops, n):
    return [list(ops) for _ in range(n)]


SPACES = {
    'darts': dict(kind='darts', normal=_same(PRIMITIVES, DARTS_EDGES), reduce=_same(PRIMITIVES, DARTS_EDGES)),
    's1': dict(kind='darts', normal=_S1_NORMAL, reduce=_S1_REDUCE),
    's2': dict(kind='darts', normal=_same(['skip_connect', 'sep_conv_3x3'], DARTS_EDGES),
               reduce=_same(['skip_connect', 'sep_conv_3x3'], DARTS_EDGES)),
    's3': dict(kind='darts', normal=_same(['none', 'skip_connect', 'sep_conv_3x3'], DARTS_EDGES),
               reduce=_same(['none', 'skip_connect', 'sep_conv_3x3'], DARTS_EDGES)),
    's4': dict(kind='darts', normal=_same(['noise', 'sep_conv_3x3'], DARTS_EDGES),
               reduce=_same(['noise', 'sep_conv_3x3'], DARTS_EDGES)),
    'nb201': dict(kind='nb201', normal=_same(NB201_PRIMITIVES, NB201_EDGES)),
}


def get_space(name):
    if not isinstance(name, str) or name not in SPACES:
        raise ValueError(f"unknown search space '{name}' (choose from {', '.join(SPACES)})")
    check_space(name, SPACES[name])
    return SPACES[name]


def check_space(name, space):
    """Raise ValueError with one sentence where a space in SPACES cannot be built: its kind, its edge count, an op
    name ALL_OPS lacks (it mirrors ops.OPS, which this file may not import), or edges whose candidates are not laid
    out alike (a cell scores its edges as one tensor, and DARTS's alpha is one table per cell type)."""
    kind = space.get('kind') if isinstance(space, dict) else None
    if kind not in ('darts', 'nb201'):
        raise ValueError(f"search space '{name}' needs kind 'darts' or 'nb201', not {kind!r}")
    n_edges = DARTS_EDGES if kind == 'darts' else NB201_EDGES
    for cell in cell_types(kind):
        edges = space.get(cell)
        if not isinstance(edges, (list, tuple)) or len(edges) != n_edges:
            raise ValueError(f"search space '{name}': its {cell} cell needs {n_edges} candidate lists, one per edge "
                             f"in node-major order")
        for e, ops in enumerate(edges):
            unknown = [op for op in ops if op not in ALL_OPS]
            if unknown:
                raise ValueError(f"search space '{name}': edge {e} of its {cell} cell names op '{unknown[0]}', which "
                                 f"is not in genotypes.ALL_OPS (add it there and to ops.OPS)")
            if all(op == 'none' for op in ops):
                raise ValueError(f"search space '{name}': edge {e} of its {cell} cell has no candidate but 'none'")
        if len({(len(ops), tuple(op == 'none' for op in ops)) for ops in edges}) != 1:
            raise ValueError(f"search space '{name}': every edge of its {cell} cell needs the same number of "
                             f"candidates, with 'none' in the same places")


def cell_types(kind):
    """The cell types a space of this kind searches, each with its own edge lists (and DARTS's own alpha table):
    normal and reduction cells in DARTS-style spaces, NAS-Bench-201's one cell."""
    return ('normal', 'reduce') if kind == 'darts' else ('normal',)


def node_inputs(kind):
    """[(node, [input states]), ...] in edge order: DARTS node k takes states 0..k+1 (two cell inputs
    first); NB201 node k (1-based) takes states 0..k-1."""
    if kind == 'darts':
        return [(k + 2, list(range(k + 2))) for k in range(STEPS)]
    return [(k, list(range(k))) for k in range(1, NB201_NODES + 1)]


def node_pairs(n_inputs):
    """Unordered pairs of a node's incoming edges, in the order pair weights are stored."""
    return list(itertools.combinations(range(n_inputs), 2))


# ---------------------------------------------------------------------------------------------
# Published genotypes

DARTS_V1 = Genotype(
    normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)],
    reduce_concat=[2, 3, 4, 5])
DARTS_V2 = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1),
            ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5])
NASNet = Genotype(
    normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), ('sep_conv_3x3', 0),
            ('avg_pool_3x3', 1), ('skip_connect', 0), ('avg_pool_3x3', 0), ('avg_pool_3x3', 0),
            ('sep_conv_3x3', 1), ('skip_connect', 1)],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1), ('sep_conv_7x7', 0),
            ('avg_pool_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 3), ('avg_pool_3x3', 2),
            ('sep_conv_3x3', 2), ('max_pool_3x3', 1)],
    reduce_concat=[4, 5, 6])
AmoebaNet = Genotype(
    normal=[('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 2),
            ('sep_conv_3x3', 0), ('avg_pool_3x3', 3), ('sep_conv_3x3', 1), ('skip_connect', 1),
            ('skip_connect', 0), ('avg_pool_3x3', 1)],
    normal_concat=[4, 5, 6],
    reduce=[('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('max_pool_3x3', 0), ('sep_conv_7x7', 2),
            ('sep_conv_7x7', 0), ('avg_pool_3x3', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1),
            ('conv_7x1_1x7', 0), ('sep_conv_3x3', 5)],
    reduce_concat=[3, 4, 6])
PC_DARTS = Genotype(
    normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1),
            ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2),
            ('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)],
    reduce_concat=[2, 3, 4, 5])
PDARTS = Genotype(
    normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2),
            ('max_pool_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)],
    reduce_concat=[2, 3, 4, 5])
DARTS = DARTS_V2  # the name the original repository's train.py uses by default

PUBLISHED = dict(DARTS_V1=DARTS_V1, DARTS_V2=DARTS_V2, DARTS=DARTS, NASNet=NASNet, AmoebaNet=AmoebaNet,
                 PC_DARTS=PC_DARTS, PDARTS=PDARTS)
# The best NAS-Bench-201 cell on CIFAR-10 (valid 91.61 / test 94.37, the best of both columns), and the cell of
# MIDAS's published result (valid 91.55 / test 94.36, CIFAR-100 test 73.51): the same but for edge 2->3.
NB201_BEST = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|'
NB201_PAPER = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|'


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201 arch strings: '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|', node by node

def nb201_parse(arch):
    """Arch string -> list of 6 op names in edge order (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2)."""
    if not isinstance(arch, str):
        raise ValueError(f"malformed NAS-Bench-201 arch: expected a string like '|op~0|+|op~0|op~1|+...', got {arch!r}")
    nodes = arch.strip().split('+')
    if len(nodes) != NB201_NODES:
        raise ValueError(f"malformed NAS-Bench-201 arch string '{arch}': expected {NB201_NODES} nodes joined by '+'")
    ops = []
    for k, node in enumerate(nodes, start=1):
        parts = node[1:-1].split('|')
        if len(parts) != k or len(node) < 2 or not node.startswith('|') or not node.endswith('|'):
            raise ValueError(f"malformed NAS-Bench-201 arch string '{arch}': node {k} must have {k} inputs")
        for j, part in enumerate(parts):
            op, _, src = part.partition('~')
            if src != str(j):
                raise ValueError(f"malformed NAS-Bench-201 arch string '{arch}': expected input ~{j} in '{part}'")
            if op not in ALL_OPS:   # the benchmark's five, or any op of an NB201-kind space of one's own
                raise ValueError(f"unknown NAS-Bench-201 op '{op}' (choose from {', '.join(NB201_PRIMITIVES)}; a space "
                                 f"of one's own may name any op of genotypes.ALL_OPS)")
            ops.append(op)
    return ops


def nb201_str(ops):
    out, e = [], 0
    for k in range(1, NB201_NODES + 1):
        out.append('|' + '|'.join(f'{ops[e + j]}~{j}' for j in range(k)) + '|')
        e += k
    return '+'.join(out)


# ---------------------------------------------------------------------------------------------
# Genotypes: validation, JSON, parsing of what DARTS-family repositories print

def validate_genotype(genotype, space_name=None):
    """Raise ValueError with one clear sentence if the genotype is malformed or not in the space."""
    if isinstance(genotype, str):  # an NB201 arch string
        ops = nb201_parse(genotype)
        if space_name is not None:
            space = get_space(space_name)
            if space['kind'] != 'nb201':
                raise ValueError(f"a NAS-Bench-201 cell cannot be used with space '{space_name}'")
            for e, (op, allowed) in enumerate(zip(ops, space['normal'])):
                if op not in allowed:
                    raise ValueError(f"op '{op}' is not a candidate of edge {e} of space '{space_name}' "
                                     f"(allowed: {', '.join(allowed)})")
        return
    space = get_space(space_name) if space_name else None
    if space is not None and space['kind'] != 'darts':
        raise ValueError(f"a DARTS-style genotype cannot be used with space '{space_name}'")
    for cell in ('normal', 'reduce'):
        edges, concat = getattr(genotype, cell), list(getattr(genotype, cell + '_concat'))
        if not edges or len(edges) % 2:
            raise ValueError(f"malformed genotype: '{cell}' needs an even number of (op, input) pairs")
        n_nodes = len(edges) // 2
        for n, (op, src) in enumerate(edges):
            node = n // 2 + 2
            if not isinstance(op, str) or op not in ALL_OPS:
                raise ValueError(f"unknown op '{op}' in the {cell} cell (choose from {', '.join(ALL_OPS)})")
            if type(src) is not int or not 0 <= src < node:
                raise ValueError(f"malformed genotype: input {src!r} of node {node} in the {cell} cell "
                                 f"must be in 0..{node - 1}")
        # the cell's inputs cannot be concatenated: in a reduction cell they are twice the nodes' resolution
        if not concat or len(set(concat)) < len(concat) or any(type(c) is not int or not 2 <= c < n_nodes + 2
                                                               for c in concat):
            raise ValueError(f"malformed genotype: {cell}_concat {concat} must name nodes 2..{n_nodes + 1}, each once")
        if space is not None:
            if n_nodes != STEPS:
                raise ValueError(f"genotype has {n_nodes} nodes per {cell} cell, space '{space_name}' has {STEPS}")
            allowed = space[cell]
            for n, (op, src) in enumerate(edges):
                node = n // 2
                edge = sum(k + 2 for k in range(node)) + src
                if op not in allowed[edge]:
                    raise ValueError(f"op '{op}' is not a candidate of edge {src}->{node + 2} of the {cell} cell "
                                     f"in space '{space_name}' (allowed: {', '.join(allowed[edge])})")


def genotype_to_json(genotype, space_name):
    if isinstance(genotype, str):
        return {'space': space_name, 'arch': genotype}
    return {'space': space_name,
            'normal': [list(p) for p in genotype.normal], 'normal_concat': list(genotype.normal_concat),
            'reduce': [list(p) for p in genotype.reduce], 'reduce_concat': list(genotype.reduce_concat)}


def genotype_from_json(obj):
    """-> (genotype or NB201 arch string, space name or None)."""
    if not isinstance(obj, dict):
        raise ValueError('malformed genotype JSON: expected an object')
    if 'arch' in obj:
        nb201_parse(obj['arch'])
        return obj['arch'], obj.get('space', 'nb201')
    try:
        g = Genotype(normal=[(op, i) for op, i in obj['normal']], normal_concat=list(obj['normal_concat']),
                     reduce=[(op, i) for op, i in obj['reduce']], reduce_concat=list(obj['reduce_concat']))
    except (KeyError, TypeError, ValueError):
        raise ValueError("malformed genotype JSON: needs 'normal', 'normal_concat', 'reduce', 'reduce_concat' "
                         "as lists of [op, input] pairs and state indices") from None
    return g, obj.get('space')


def _literal(node):
    """ast node -> Python value, allowing range(a, b) besides plain literals (never eval)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'range' and not node.keywords:
        span = range(*[ast.literal_eval(a) for a in node.args])
        if len(span) > 64:   # a concat list names a few nodes; never build a huge one
            raise ValueError(f'{span} is too long for a concat list')
        return list(span)
    return ast.literal_eval(node)


def parse_genotype_literal(text):
    """Parse 'Genotype(normal=[...], normal_concat=range(2, 6), reduce=[...], reduce_concat=[...])'."""
    try:
        call = ast.parse(text.strip(), mode='eval').body
        if not isinstance(call, ast.Call) or getattr(call.func, 'id', getattr(call.func, 'attr', None)) != 'Genotype':
            raise ValueError
        named = [kw.arg for kw in call.keywords]   # what Genotype(...) itself would refuse, refused: no field
        if (len(call.args) > 4 or len(set(named)) < len(named)   # dropped, misspelt or given twice
                or any(n not in Genotype._fields[len(call.args):] for n in named)):
            raise ValueError
        fields = dict(zip(Genotype._fields, [_literal(a) for a in call.args]))
        fields.update({kw.arg: _literal(kw.value) for kw in call.keywords})
        g = Genotype(**{f: fields[f] for f in Genotype._fields})
        if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in [*g.normal, *g.reduce]) or not all(
                isinstance(c, (list, tuple)) for c in (g.normal_concat, g.reduce_concat)):
            raise ValueError
        return Genotype([tuple(p) for p in g.normal], list(g.normal_concat), [tuple(p) for p in g.reduce],
                        list(g.reduce_concat))
    except (SyntaxError, ValueError, TypeError, KeyError, OverflowError, RecursionError, MemoryError):
        raise ValueError('malformed genotype literal: expected Genotype(normal=[(op, input), ...], '
                         'normal_concat=..., reduce=[...], reduce_concat=...)') from None


def load_genotype(spec):
    """A genotype from what a user types: a JSON file (search.py's genotype.json), a published name
    (DARTS_V2), a Genotype(...) literal, or an NB201 arch string. -> (genotype or arch string, space)."""
    spec = spec.strip()
    if os.path.isfile(spec):
        try:
            with open(spec) as f:
                obj = json.load(f)
        except (OSError, ValueError, RecursionError) as e:   # ValueError: bad JSON, and bytes that are not UTF-8
            raise ValueError(f"cannot read genotype file '{spec}': {type(e).__name__}: {e}") from None
        g, space = genotype_from_json(obj)
    elif spec in PUBLISHED:
        g, space = PUBLISHED[spec], None
    elif spec.startswith('Genotype'):
        g, space = parse_genotype_literal(spec), None
    elif spec.startswith('|'):
        g, space = spec, 'nb201'
    else:
        raise ValueError(f"cannot read genotype '{spec}': not a file, a published name ({', '.join(PUBLISHED)}), "
                         "a Genotype(...) literal or a NAS-Bench-201 arch string")
    validate_genotype(g, space)
    return g, space


# ---------------------------------------------------------------------------------------------
# Decoding (METHOD.md §8). Inputs are the averaged weights of one cell type:
#   weights[e][j]  mean mixing weight of candidate j on edge e (edge order as in the space)
#   pairs[node][p] mean pair probability pi of node_pairs(n_inputs)[p] (topology only)

def _check_shape(ops_per_edge, weights):
    """Weights of another space would otherwise decode silently into a wrong cell (zip stops at the shorter)."""
    if len(weights) != len(ops_per_edge) or any(len(w) != len(ops) for ops, w in zip(ops_per_edge, weights)):
        raise ValueError(f'weights of {[len(w) for w in weights]} candidates per edge do not fit a space of '
                         f'{[len(ops) for ops in ops_per_edge]}')


def _best_op(ops, w, include_none=False):
    """Argmax over the candidates ('none' only with include_none), with the margin to the runner-up (METHOD.md §12
    asks for it; None where there is no runner-up: JSON has no infinity). An exact tie goes to the first candidate,
    as argmax. -> (op, its weight, margin)."""
    ranked = sorted((x, -j, op) for j, (op, x) in enumerate(zip(ops, w)) if include_none or op != 'none')
    best = ranked[-1]
    margin = best[0] - ranked[-2][0] if len(ranked) > 1 else None
    return best[2], best[0], margin


def decode_darts_cell(ops_per_edge, weights, pairs=None):
    """-> ([(op, input)] * 8, margins). With pairs: keep each node's most probable pair of edges
    (the topology rule); without: the DARTS rule, the two edges with the strongest non-'none' op."""
    _check_shape(ops_per_edge, weights)
    if pairs is not None and [len(p) for p in pairs] != [len(node_pairs(len(i))) for _, i in node_inputs('darts')]:
        raise ValueError(f'pair weights of {[len(p) for p in pairs]} pairs per node do not fit a DARTS cell')
    cell, margins, e0 = [], [], 0
    for node, inputs in node_inputs('darts'):
        edges = [e0 + i for i in inputs]
        best = [_best_op(ops_per_edge[e], weights[e]) for e in edges]
        if pairs is not None:
            pi = pairs[node - 2]
            order = sorted(range(len(pi)), key=lambda p: -pi[p])
            kept = node_pairs(len(inputs))[order[0]]
            node_margin = pi[order[0]] - pi[order[1]] if len(order) > 1 else None
        else:
            order = sorted(inputs, key=lambda i: -best[i][1])
            kept = sorted(order[:2])
            node_margin = best[order[1]][1] - best[order[2]][1] if len(order) > 2 else None
        for i in sorted(kept):
            cell.append((best[i][0], i))
            margins.append({'node': node, 'input': i, 'op': best[i][0], 'op_margin': best[i][2],
                            'edge_margin': node_margin})
        e0 += len(inputs)
    return cell, margins


def decode_darts(space_name, weights, pairs=None):
    """weights/pairs: dicts by cell type ('normal', 'reduce'). -> (Genotype, margins by cell type)."""
    space = get_space(space_name)
    out, margins = {}, {}
    for cell in ('normal', 'reduce'):
        out[cell], margins[cell] = decode_darts_cell(space[cell], weights[cell], pairs[cell] if pairs else None)
    concat = list(range(2, STEPS + 2))
    return Genotype(out['normal'], concat, out['reduce'], concat), margins


def decode_nb201(weights, ops_per_edge=None, include_none=True):
    """Per edge the argmax over the candidates, 'none' included (METHOD.md §8) unless include_none is
    False (search.py's default, --decode-none exclude: 'none' can disconnect the cell). -> (arch string, margins)."""
    ops_per_edge = ops_per_edge or SPACES['nb201']['normal']   # an NB201-kind space of one's own passes its lists
    _check_shape(ops_per_edge, weights)
    chosen, margins = [], []
    for ops, w in zip(ops_per_edge, weights):
        op, _, margin = _best_op(ops, w, include_none)
        chosen.append(op)
        margins.append({'op': op, 'op_margin': margin})
    return nb201_str(chosen), margins
