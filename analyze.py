"""See what a search decided: cell diagrams, mosaic maps and the mixing-weight distributions.

    python analyze.py diagram --genotype RUN/genotype.json --out DIR   # DOT, + SVG/PNG when `dot` is installed
    python analyze.py mosaic --run RUN [--images 4] [--cells 0,1]     # per-patch winning op, PNG per cell
    python analyze.py report --run RUN [--samples 512]                 # RUN/analysis/{analysis.json, report.md}
    python analyze.py compare RUN1 RUN2 ... [--out FILE]               # discrimination per cell of reported runs
    python analyze.py nb201 RUN1 RUN2 ... [--out FILE]                 # NB201 accuracy by setting, mean +- std

A report runs the search's supernet over --samples test images and, per search cell, edge and candidate op,
looks at the per-image weight w_i (the op's mixing weight averaged over the patches of image i):
  distribution    mean, std and histogram of w_i; Sarle's bimodality coefficient b (unimodal when b < 5/9)
  class-awareness one-way ANOVA of w_i by class: F (about 1 when the class does not matter) and eta^2
  discrimination  normalised entropy and top-1 margin of the mean weights of each edge (the weights decoding
                  reads, 'none' included), and the mean entropy of the per-patch weights (how decisively each
                  patch picks)
  scores          each op's logit less its edge's mean logit (MIDAS's score up to a constant per image and patch):
                  its level and its spread over images and patches, which together make the mean weight
Runtime needs torch and numpy only: PNGs are encoded here with zlib, and Graphviz's `dot` is used if on PATH.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import torch

from data import DATASETS, load_dataset, normalize
from genotypes import SPACES, genotype_from_json, load_genotype, nb201_parse, node_inputs, validate_genotype
from model import ArchConfig, SearchNetwork, aux_skip_weight
from train import Parser, RunError, atomic_write, pick_device, run_cli, write_json

UNIMODAL = 5 / 9  # Sarle's b of a uniform distribution: less is read as unimodal


def write_bytes(path, payload):
    atomic_write(path, lambda f: f.write(payload))


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:   # ValueError: not JSON, or not UTF-8
        raise RunError(f"cannot read '{path}': {e}") from None


# ---------------------------------------------------------------------------------------------
# Cell diagrams in the layout of DARTS's visualize.py: inputs c_{k-2}, c_{k-1}, intermediate nodes,
# edges labelled with their op, output c_{k}. The DOT text is written here (no graphviz package).

def cell_graph(genotype, cell):
    """-> (nodes [(name, fill colour)], edges [(from, to, op or None for an output edge)]).
    cell: 'normal' or 'reduce' of a DARTS-style Genotype, or 'nb201' for an arch string (one input
    c_{k-1}, nodes 1..3, output = node 3; a 'none' edge is kept, drawn dashed)."""
    if cell == 'nb201':
        names = ['c_{k-1}', '1', '2', '3']
        pairs = zip(nb201_parse(genotype), [(i, k) for k, inputs in node_inputs('nb201') for i in inputs])
        edges = [(names[i], names[k], op) for op, (i, k) in pairs]
        return ([(names[0], 'darkseagreen2')] + [(n, 'lightblue') for n in names[1:]] + [('c_{k}', 'palegoldenrod')],
                edges + [(names[-1], 'c_{k}', None)])
    ops, concat = getattr(genotype, cell), getattr(genotype, cell + '_concat')
    names = ['c_{k-2}', 'c_{k-1}'] + [str(i) for i in range(len(ops) // 2)]
    edges = [(names[j], names[n // 2 + 2], op) for n, (op, j) in enumerate(ops)]
    return ([(n, 'darkseagreen2') for n in names[:2]] + [(n, 'lightblue') for n in names[2:]]
            + [('c_{k}', 'palegoldenrod')], edges + [(names[s], 'c_{k}', None) for s in concat])


def to_dot(name, nodes, edges):
    lines = [f'digraph {name} {{', '  rankdir=LR;', '  edge [fontsize=20, fontname="times"];',
             '  node [style=filled, shape=rect, align=center, fontsize=20, height=0.5, width=0.5, penwidth=2, '
             'fontname="times"];']
    lines += [f'  "{n}" [fillcolor={colour}];' for n, colour in nodes]
    for u, v, op in edges:
        attrs = 'fillcolor=gray' if op is None else f'label="{op}", fillcolor=gray'
        lines.append(f'  "{u}" -> "{v}" [{attrs}{", style=dashed" if op == "none" else ""}];')
    return '\n'.join(lines + ['}']) + '\n'


def to_mermaid(nodes, edges):
    """The same graph as a Mermaid flowchart: GitHub draws it in Markdown, so a report shows its cells
    even where Graphviz is not installed."""
    ids = {n: f'n{i}' for i, (n, _) in enumerate(nodes)}
    lines = ['flowchart LR'] + [f'  {ids[n]}["{n}"]' for n, _ in nodes]
    for u, v, op in edges:
        arrow = '-->' if op is None else ('-.->' if op == 'none' else '-->') + f'|{op}|'
        lines.append(f'  {ids[u]} {arrow} {ids[v]}')
    return '\n'.join(lines) + '\n'


def diagram_cells(genotype):
    """[(file stem, cell)]: DARTS's file names normal / reduction, one 'cell' for an NB201 arch string."""
    return [('cell', 'nb201')] if isinstance(genotype, str) else [('normal', 'normal'), ('reduction', 'reduce')]


def write_diagrams(genotype, out_dir, prefix=''):
    """Write OUT_DIR/PREFIX{normal,reduction}.dot (NB201: PREFIXcell.dot) and, when Graphviz's `dot` is on
    PATH, .svg and .png beside them. Graphviz is optional, so its failure is a warning. -> paths written."""
    dot = shutil.which('dot')
    paths = []
    for stem, cell in diagram_cells(genotype):
        text = to_dot(stem, *cell_graph(genotype, cell))
        base = os.path.join(out_dir, prefix + stem)
        write_bytes(base + '.dot', text.encode())
        paths.append(base + '.dot')
        for fmt in ('svg', 'png') if dot else ():
            try:
                r = subprocess.run([dot, '-T' + fmt], input=text.encode(), capture_output=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired) as e:
                r = subprocess.CompletedProcess([dot], 1, b'', str(e).encode())
            if r.returncode != 0 or not r.stdout:
                print(f"warning: Graphviz dot could not draw {base}.{fmt}: "
                      f"{r.stderr.decode(errors='replace').strip()[:200]}", file=sys.stderr)
                continue
            write_bytes(f'{base}.{fmt}', r.stdout)
            paths.append(f'{base}.{fmt}')
    return paths


# ---------------------------------------------------------------------------------------------
# PNG: 8-bit RGB, no filtering, one zlib stream. Enough for maps of flat colour, and no PIL needed.

def png_bytes(rgb):
    """H x W x 3 uint8 array -> the bytes of a PNG file."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, 3 * w)], axis=1).tobytes()  # filter 0 per row

    def chunk(kind, payload):
        return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))

    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw, 9)) + chunk(b'IEND', b''))


# A 3x5 pixel font for the PNG labels: 15 bits per glyph, rows top to bottom. Lower case prints as upper.
_GLYPHS = """
A 010101111101101 B 110101110101110 C 011100100100011 D 110101101101110 E 111100110100111 F 111100110100100
G 011100101101011 H 101101111101101 I 111010010010111 J 001001001101010 K 101101110101101 L 100100100100111
M 101111111101101 N 110101101101101 O 010101101101010 P 110101110100100 Q 010101101110011 R 110101110101101
S 011100010001110 T 111010010010010 U 101101101101111 V 101101101101010 W 101101111111101 X 101101010101101
Y 101101010010010 Z 111001010100111 0 111101101101111 1 010110010010111 2 110001010100111 3 110001010001110
4 101101111001001 5 111100110001110 6 011100111101111 7 111001010010010 8 111101111101111 9 111101111001110
_ 000000000000111 - 000000111000000 > 100010001010100 < 001010100010001 . 000000000000010 : 000010000010000
( 001010010010001 ) 100010010010100 / 001001010100100 = 000111000111000 % 101001010100101 , 000000000010100
+ 000010111010000 # 101111101111101
""".split()
FONT = dict(zip(_GLYPHS[0::2], _GLYPHS[1::2]))


def draw_text(img, x, y, text, scale=2, colour=(0, 0, 0)):
    """Print text at (x, y) (top left) in the 3x5 font, each font pixel scale x scale; unknown glyphs are blank."""
    for k, ch in enumerate(text.upper()):
        bits = FONT.get(ch, '0' * 15)
        for p, bit in enumerate(bits):
            if bit == '1':
                r, c = y + scale * (p // 3), x + scale * (4 * k + p % 3)
                img[r:r + scale, c:c + scale] = colour


def text_width(text, scale=2):
    return 4 * scale * len(text) - scale


# One colour per op name, the same in every run; ops that share a colour never share a space.
OP_COLOURS = {
    'none': (90, 90, 90), 'max_pool_3x3': (31, 119, 180), 'avg_pool_3x3': (158, 202, 225),
    'skip_connect': (255, 127, 14), 'sep_conv_3x3': (44, 160, 44), 'sep_conv_5x5': (166, 216, 84),
    'dil_conv_3x3': (214, 39, 40), 'dil_conv_5x5': (247, 129, 191), 'noise': (148, 103, 189),
    'sep_conv_7x7': (140, 86, 75), 'conv_7x1_1x7': (188, 189, 34),
    'nor_conv_1x1': (148, 103, 189), 'nor_conv_3x3': (214, 39, 40),
}
# Ops of one's own (not above): one of these by a stable hash of the name, never black, the same in every run
_SPARE_COLOURS = [(23, 190, 207), (0, 128, 128), (255, 187, 120), (152, 223, 138), (255, 152, 150),
                  (197, 176, 213), (196, 156, 148), (219, 219, 141), (158, 218, 229), (247, 182, 210)]


def op_colour(op):
    return OP_COLOURS.get(op) or _SPARE_COLOURS[zlib.crc32(op.encode()) % len(_SPARE_COLOURS)]


# ---------------------------------------------------------------------------------------------
# A search run: its supernet, its images, and the weights the supernet gives them

def load_run(run, device):
    """Rebuild the supernet of a search.py run folder from checkpoint.pt (its 'config' and weights), with
    args.json for anything the checkpoint does not record. -> (model in eval mode, settings dict)."""
    ckpt = os.path.join(run, 'checkpoint.pt')
    if not os.path.isfile(ckpt):
        raise RunError(f"no checkpoint.pt in '{run}': give the folder a search wrote (search.py --save)")
    settings = read_json(os.path.join(run, 'args.json')) if os.path.isfile(os.path.join(run, 'args.json')) else {}
    try:
        state = torch.load(ckpt, map_location='cpu', weights_only=False)
    except Exception as e:
        raise RunError(f"checkpoint '{ckpt}' is unreadable ({type(e).__name__})") from None
    if not (isinstance(settings, dict) and isinstance(state, dict) and isinstance(state.get('config', {}), dict)):
        raise RunError(f"'{run}' does not hold a search.py run (its args.json or checkpoint.pt is of something else)")
    settings.update(state.get('config', {}))
    settings['checkpoint_epoch'] = state.get('epoch')   # a killed or running search stopped short of 'epochs'
    missing = [k for k in ('space', 'method', 'dataset', 'init_channels', 'layers', 'cells') if k not in settings]
    if missing:
        raise RunError(f"'{run}' does not record {', '.join(missing)} (neither args.json nor the checkpoint)")
    if not isinstance(settings['dataset'], str) or settings['dataset'] not in DATASETS:
        raise RunError(f"'{run}' records dataset {settings['dataset']!r}, which this code does not know")
    ran = with_older_flags(settings)
    cfg = ArchConfig(**{f.name: ran[f.name] for f in dataclasses.fields(ArchConfig) if f.name in ran})
    model = SearchNetwork(settings['space'], settings['init_channels'], DATASETS[settings['dataset']]['num_classes'],
                          settings['layers'], settings['cells'], cfg)
    try:
        model.load_state_dict(state['model'])
    except (KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"checkpoint '{ckpt}' does not fit the supernet this code builds ({first})") from None
    if ran.get('aux_skip'):   # the auxiliary skips as in the checkpoint's last epoch; none in a finished search,
        model.aux_skip = True  # whose final decode read it without them
        epoch = state.get('epoch', 1)
        model.aux_beta.fill_(0.0 if epoch >= settings['epochs'] else aux_skip_weight(epoch - 1, settings['epochs']))
    return model.to(device).eval(), settings


def load_images(settings, root, split, n, download=False):
    """n images of a split ('test' or 'train') of the run's dataset, from root (None: the run's --data), drawn
    with a fixed seed so that files sorted by class still give every class: (uint8 N x 3 x H x W to draw,
    normalised floats, labels)."""
    root = root or settings.get('data', './data')
    x, y = load_dataset(settings['dataset'], root, train=split == 'train', download=download)
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    x, y = x[chosen], y[chosen]
    meta = DATASETS[settings['dataset']]
    return x, normalize(x, meta['mean'], meta['std']), y


@torch.no_grad()
def record_weights(model, x, batch_size=64, keep_maps=0):
    """Run the supernet (eval mode) over normalised images x and keep, per search cell and edge: the
    per-image weights (mean over patches, N x J), the per-image mean normalised entropy of the patch
    weights (N), the per-image mean of each op's centred logit and of its square (N x J each) and, for the
    first keep_maps images, the winning op of every patch (keep_maps x gh x gw).
    A static DARTS table (1 x J x 1 x 1) counts as the same weights for every image."""
    cells = model.search_cells()
    index = {id(c): i for i, c in enumerate(cells)}
    records = []
    for cell in cells:
        edges = [f'{i}->{node}' for node, srcs in cell.nodes for i in srcs]
        records.append({'type': model.cell_type(cell), 'edges': edges, 'ops': [op.primitives for op in cell._ops],
                        'grid': None, 'w': [[] for _ in edges], 'patch_entropy': [[] for _ in edges],
                        'logit': [[] for _ in edges], 'logit_sq': [[] for _ in edges], 'maps': [[] for _ in edges]})
    batch = {'n': 0, 'seen': 0}

    def recorder(cell, n, w, gamma, pi):
        rec = records[index[id(cell)]]
        e0 = sum(len(srcs) for _, srcs in cell.nodes[:n])
        for e, we in enumerate(w, start=e0):
            we = we.float().expand(batch['n'], -1, -1, -1)
            rec['grid'] = tuple(we.shape[-2:])
            rec['w'][e].append(we.mean((2, 3)).cpu().numpy())
            log_w = we.clamp_min(1e-30).log()
            # the scores up to one constant per image and patch: MIDAS's scores less their mean over the edge's ops
            logit = log_w - log_w.mean(1, keepdim=True)
            rec['logit'][e].append(logit.mean((2, 3)).cpu().numpy())
            rec['logit_sq'][e].append(logit.square().mean((2, 3)).cpu().numpy())
            ent = -(we * log_w).sum(1) / math.log(we.shape[1])
            rec['patch_entropy'][e].append(ent.mean((1, 2)).cpu().numpy())
            keep = keep_maps - batch['seen']
            if keep > 0:
                rec['maps'][e].append(we[:keep].argmax(1).cpu().numpy())

    torch.manual_seed(0)  # RDARTS S4's 'noise' op draws random numbers even in eval mode
    device = next(model.parameters()).device
    for k in range(0, len(x), batch_size):
        xb = x[k:k + batch_size].to(device)
        batch['n'] = len(xb)
        model(xb, recorder=recorder)
        batch['seen'] += len(xb)
    for rec in records:
        for key in ('w', 'patch_entropy', 'logit', 'logit_sq', 'maps'):
            rec[key] = [np.concatenate(parts) if parts else None for parts in rec[key]]
    return records


# ---------------------------------------------------------------------------------------------
# Statistics (plain numpy, so the tests can check them against hand computations)

def bimodality(x):
    """Sarle's bimodality coefficient b = (G1^2 + 1) / (G2 + 3 (n-1)^2 / ((n-2)(n-3))), G1 and G2 the
    sample (bias-corrected) skewness and excess kurtosis. A normal sample gives about 1/3, a uniform one
    5/9, two equal spikes nearly 1. None for n < 4 or a constant sample (a point mass: unimodal)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    d = x - x.mean()
    m2 = (d ** 2).mean() if n else 0.0
    if n < 4 or m2 < 1e-20:  # float32 weights resolve ~1e-8: a smaller spread is a constant
        return None
    g1, g2 = (d ** 3).mean() / m2 ** 1.5, (d ** 4).mean() / m2 ** 2 - 3
    G1 = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    G2 = ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))
    return float((G1 ** 2 + 1) / (G2 + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def class_separation(x, y):
    """One-way ANOVA of x by class label y -> (F, eta^2): F = between-class mean square / within-class mean
    square, eta^2 = between / total sum of squares. None where undefined (one class, no more images than
    classes, or no spread)."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    _, inv = np.unique(y, return_inverse=True)
    k, n = int(inv.max()) + 1 if len(inv) else 0, len(x)
    if k < 2 or n <= k:
        return None, None
    counts = np.bincount(inv)
    means = np.bincount(inv, weights=x) / counts
    ss_between = float((counts * (means - x.mean()) ** 2).sum())
    ss_within = float(((x - means[inv]) ** 2).sum())
    f = (ss_between / (k - 1)) / (ss_within / (n - k)) if ss_within > 1e-20 else None
    eta2 = ss_between / (ss_between + ss_within) if ss_between + ss_within > 1e-20 else None
    return f, eta2


def sharpness(p):
    """-> (entropy / log J: 0 when one op has all the weight, 1 when uniform; top-1 minus top-2 weight)."""
    p = np.asarray(p, np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    top = np.sort(p)
    return float(-(nz * np.log(nz)).sum() / math.log(len(p))), float(top[-1] - top[-2])


def histogram(x, bins):
    lo, hi = float(x.min()), float(x.max())
    counts, _ = np.histogram(x, bins=bins, range=(lo, hi))  # numpy widens an empty range by +-0.5
    return {'lo': lo, 'hi': hi, 'counts': counts.tolist()}


def mean_of(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(edges):
    """Averages over edges (and ops) of what analyse() computes per edge."""
    return {'entropy': mean_of(e['entropy'] for e in edges), 'margin': mean_of(e['margin'] for e in edges),
            'patch_entropy': mean_of(e['patch_entropy'] for e in edges),
            'class_f': mean_of(f for e in edges for f in e['class_f']),
            'class_eta2': mean_of(v for e in edges for v in e['class_eta2']),
            'unimodal_share': mean_of(float(u) for e in edges for u in e['unimodal'])}


def analyse(records, labels, bins=10):
    """Per cell: the per-edge statistics and their averages (see the module docstring)."""
    cells = []
    for c, rec in enumerate(records):
        edges = []
        for e, name in enumerate(rec['edges']):
            w, ops = rec['w'][e], rec['ops'][e]
            mean, std = w.mean(0), np.where(np.ptp(w, 0) == 0, 0.0, w.std(0))  # a static table: exactly 0
            entropy, margin = sharpness(mean)
            b = [bimodality(w[:, j]) for j in range(len(ops))]
            sep = [class_separation(w[:, j], labels) for j in range(len(ops))]
            score = rec['logit'][e].astype(np.float64).mean(0)   # mean and std over images and patches
            spread = np.sqrt(np.clip(rec['logit_sq'][e].astype(np.float64).mean(0) - score ** 2, 0, None))
            edges.append({'edge': name, 'ops': ops, 'mean': mean.tolist(), 'std': std.tolist(),
                          'score': score.tolist(), 'score_std': spread.tolist(), 'entropy': entropy, 'margin': margin,
                          'patch_entropy': float(rec['patch_entropy'][e].mean()),
                          'bimodality': b, 'unimodal': [v is None or v < UNIMODAL for v in b],
                          'class_f': [f for f, _ in sep], 'class_eta2': [v for _, v in sep],
                          'hist': [histogram(w[:, j], bins) for j in range(len(ops))]})
        cells.append({'cell': c, 'type': rec['type'], 'grid': list(rec['grid']), **summarise(edges), 'edges': edges})
    return cells


# ---------------------------------------------------------------------------------------------
# Mosaic maps: per image, the image beside the winning op of every patch of every chosen edge

PANEL, GAP, LABEL_W, SCALE = 96, 6, 52, 2  # panel side, spacing, class column width, font scale (pixels)


def upsample(a, size):
    """Nearest-neighbour resize of the first two axes of a to size x size."""
    return a[np.arange(size) * a.shape[0] // size][:, np.arange(size) * a.shape[1] // size]


def mosaic_png(images, labels, rec, edges, title):
    """-> H x W x 3 uint8: a header, one row per image (class, image, a map per edge), a colour legend."""
    line = 5 * SCALE + 6
    top = 2 * line + 4
    width = max(LABEL_W + (1 + len(edges)) * (PANEL + GAP) + GAP, text_width(title, SCALE) + 2 * GAP)
    ops = list(dict.fromkeys(op for e in edges for op in rec['ops'][e]))
    legend, x, y = [], GAP, 0  # (op, x, row offset) of each swatch, wrapping at the image width
    for op in ops:
        w = 16 + 6 + text_width(op, SCALE) + 16
        if x + w > width:
            x, y = GAP, y + line
        legend.append((op, x, y))
        x += w
    height = top + len(images) * (PANEL + GAP) + GAP + y + line + GAP
    img = np.full((height, width, 3), 255, np.uint8)
    draw_text(img, GAP, 4, title)
    for k, name in enumerate(['image'] + [rec['edges'][e] for e in edges]):
        draw_text(img, LABEL_W + GAP + k * (PANEL + GAP), 4 + line, name)
    draw_text(img, GAP, 4 + line, 'class')
    grid = rec['maps'][edges[0]].shape[1:]
    rows = np.arange(PANEL) * grid[0] // PANEL
    cols = np.arange(PANEL) * grid[1] // PANEL
    border = np.zeros((PANEL, PANEL), bool)  # patch borders, drawn darker so equal neighbours stay apart
    border[1:] |= (rows[1:] != rows[:-1])[:, None]
    border[:, 1:] |= (cols[1:] != cols[:-1])[None, :]
    for i, (image, label) in enumerate(zip(images, labels)):
        y0 = top + i * (PANEL + GAP)
        draw_text(img, GAP, y0 + PANEL // 2 - 5, str(int(label)))
        x0 = LABEL_W + GAP
        img[y0:y0 + PANEL, x0:x0 + PANEL] = upsample(image.permute(1, 2, 0).numpy(), PANEL)
        for k, e in enumerate(edges, start=1):
            palette = np.array([op_colour(op) for op in rec['ops'][e]], np.uint8)
            panel = palette[upsample(rec['maps'][e][i], PANEL)]
            panel[border] = (panel[border] * 0.6).astype(np.uint8)
            xk = x0 + k * (PANEL + GAP)
            img[y0:y0 + PANEL, xk:xk + PANEL] = panel
    y0 = top + len(images) * (PANEL + GAP) + GAP
    for op, x, y in legend:
        img[y0 + y:y0 + y + 5 * SCALE, x:x + 16] = op_colour(op)
        draw_text(img, x + 22, y0 + y, op)
    return img


def write_mosaics(records, images, labels, cells, edges, out_dir, name):
    paths = []
    for c in cells:
        rec = records[c]
        title = f"{name}  cell {c} {rec['type']}  {rec['grid'][0]}x{rec['grid'][1]} patches"
        path = os.path.join(out_dir, f'mosaic_cell{c}.png')
        write_bytes(path, png_bytes(mosaic_png(images, labels, rec, edges, title)))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Markdown

def fmt(v, digits=4):
    return '–' if v is None else f'{v:.{digits}f}'


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]) + '\n'


CELL_COLUMNS = [('entropy', 'entropy ↓'), ('margin', 'margin ↑'), ('patch_entropy', 'patch entropy ↓'),
                ('class_f', 'class F'), ('class_eta2', 'class η²'), ('unimodal_share', 'unimodal')]


def edge_op_table(cell, mean_key, std_key, mean_format):
    """A cell's edges as rows and the ops of its edges as columns, each entry 'mean ± std'."""
    ops = list(dict.fromkeys(op for e in cell['edges'] for op in e['ops']))
    rows = []
    for e in cell['edges']:
        by_op = {op: f'{m:{mean_format}} ± {sd:.3f}' for op, m, sd in zip(e['ops'], e[mean_key], e[std_key])}
        rows.append([e['edge']] + [by_op.get(op, '') for op in ops])
    return table(['edge'] + ops, rows)


# settings whose weights depend on the other images of a batch (batch moments of tokens or scores)
BATCH_DEPENDENT = ('token_bn', 'decorrelate', 'decorrelate_free')


def batch_dependent(settings):
    return settings.get('method') == 'midas' and any(settings.get(k) for k in BATCH_DEPENDENT)


def batches(analysis):
    """', in batches of B' where the weights depend on the batch, else ''."""
    size = analysis.get('batch_size')   # (an analysis.json older than it has none)
    return f", in batches of {size}" if size and batch_dependent(analysis['settings']) else ''


def report_markdown(analysis, diagrams, mosaics, genotype):
    s = analysis['settings']
    patch = f", patch {s.get('patch')}" if s['method'] == 'midas' else ''   # a static table has no patches
    md = [f"# What the search decided: {analysis['name']}\n",
          f"Space {s['space']}, method {s['method']}{patch}, {s['dataset']}, "
          f"epochs {s.get('epochs')}{unfinished(analysis)}; statistics over {analysis['samples']} "
          f"{analysis['split']} images (seed 0){batches(analysis)}.\n"]
    if genotype is not None:
        md.append(f'Genotype: `{genotype}`\n')
        md.append('## Cells\n')
        for stem, cell in diagram_cells(genotype):
            shown = [p for p in diagrams if os.path.basename(p) in (stem + '.svg', stem + '.png')]
            label = 'cell' if stem == 'cell' else f'{stem} cell'
            if shown:
                md.append(f'![{label}]({os.path.basename(shown[0])})\n')
            else:  # no Graphviz: GitHub draws Mermaid
                md.append(f'{label.capitalize()} ([{stem}.dot]({stem}.dot)):\n\n```mermaid\n'
                          f'{to_mermaid(*cell_graph(genotype, cell))}```\n')
    md.append('## Mosaics\n')
    if mosaics:
        md.append('The winning operation of every patch (argmax over the edge\'s candidates) per edge `from->to` '
                  '(state numbers: DARTS 0, 1 = c_{k-2}, c_{k-1} and 2..5 = nodes 0..3; NB201 0 = the input), '
                  'beside the image; left: the class label. Darker lines mark patch borders.\n')
        md += [f'![{os.path.basename(p)}]({os.path.basename(p)})\n' for p in mosaics]
    else:
        md.append('None: a --method darts run mixes with one static weight per op, the same for every image '
                  'and patch (so every std below is 0).\n')
    md.append('## Per cell\n')
    md.append(table(['cell', 'type', 'grid'] + [h for _, h in CELL_COLUMNS],
                    [[c['cell'], c['type'], '{}x{}'.format(*c['grid'])] + [fmt(c[k]) for k, _ in CELL_COLUMNS]
                     for c in analysis['cells']] +
                    [['all', '', ''] + [fmt(analysis['summary'][k]) for k, _ in CELL_COLUMNS]]))
    md.append('entropy, margin: normalised entropy and top-1 margin of each edge\'s mean weights (the weights '
              "decoding reads, 'none' included), averaged over edges; patch entropy: mean normalised entropy of the "
              'weights of single patches; class F, η²: one-way ANOVA of the per-image weights by class, averaged '
              'over edges and ops (F ≈ 1 when the class does not matter); unimodal: share of the per-op '
              "distributions with Sarle's bimodality coefficient below 5/9 (constant ones count as unimodal).\n")
    md.append('## Mean ± std of the per-image weights\n')
    for c in analysis['cells']:
        md.append(f"### Cell {c['cell']} ({c['type']}, {c['grid'][0]}x{c['grid'][1]} patches)\n")
        md.append(edge_op_table(c, 'mean', 'std', '.3f'))
    md.append('## Scores: level and spread\n')
    md.append("Each op's logit less the mean logit of its edge's ops (for MIDAS its attention score up to one "
              'constant per image and patch), mean ± std over images and patches. A weight below one half grows '
              "with its logit's spread, so an op can lead an edge's mean weights with a lower mean score.\n")
    for c in analysis['cells']:
        md.append(f"### Cell {c['cell']} ({c['type']})\n")
        md.append(edge_op_table(c, 'score', 'score_std', '+.3f'))
    return '\n'.join(md)


def load_analysis(path):
    for candidate in (path, os.path.join(path, 'analysis.json'), os.path.join(path, 'analysis', 'analysis.json')):
        if os.path.isfile(candidate):
            return read_json(candidate)
    raise RunError(f"no analysis.json for '{path}': run `python analyze.py report --run {path}` first")


def seed_groups(analyses):
    """Runs of one setting, budget and analysis that differ in their seed alone: -> [[analysis, ...], ...] of
    two runs or more, so that compare can put a mean and spread over seeds beside the single runs."""
    groups = {}
    for a in analyses:
        s = a['settings']
        ignored = {'seed', *(MIDAS_ONLY if s.get('method') != 'midas' else ())}   # as nb201's rows
        setting = {k: v if flag_used(k, s) else NOT_USED for k, v in s.items()
                   if k not in ignored}
        batch = a.get('batch_size') if batch_dependent(s) else None
        key = json.dumps([setting, a.get('split'), a.get('samples'), batch, unfinished(a)], sort_keys=True)
        groups.setdefault(key, []).append(a)
    return [g for g in groups.values()
            if len(g) > 1 and len({a['settings'].get('seed') for a in g} - {None}) == len(g)]


def method_patch(settings):
    """A compare row's method and patch columns (no patch for DARTS)."""
    return settings['method'], settings.get('patch') if settings['method'] == 'midas' else '–'


def unfinished(analysis):
    """'' or, for a supernet read from a search stopped at epoch K of N, ' (unfinished: epoch K of N)'."""
    epochs, epoch = analysis['settings'].get('epochs'), analysis.get('epoch')
    return f' (unfinished: epoch {epoch} of {epochs})' if epoch is not None and epochs and epoch < epochs else ''


def compare_markdown(analyses):
    """One table per statistic: a row per run, a column per search cell, and their mean; then, for runs that
    differ in their seed alone, a row of the mean ± population std over those seeds."""
    n_cells = max(len(a['cells']) for a in analyses)
    # the column's cell type where every run agrees on it (a DARTS-space and an NB201 run, or different --layers,
    # put reductions at different places); the grid table gives each run's own
    kinds = [{a['cells'][i]['type'] for a in analyses if i < len(a['cells'])} for i in range(n_cells)]
    column = [f'cell {i} ({kind.pop()})' if len(kind) == 1 else f'cell {i}' for i, kind in enumerate(kinds)]
    metrics = [('grid', 'Patch grid per cell')] + [
        ('entropy', 'Normalised entropy of the mean weights per edge (lower = sharper)'),
        ('margin', 'Top-1 margin of the mean weights per edge (higher = sharper)'),
        ('patch_entropy', 'Mean normalised entropy of single patches (lower = each patch picks more decisively)'),
        ('class_eta2', 'Class-awareness: η² of the per-image weights by class (no class effect: about '
                       '(classes - 1) / (images - 1))'),
        ('unimodal_share', 'Share of unimodal per-op weight distributions (Sarle b < 5/9)')]
    groups = seed_groups(analyses)
    spaces = {a['settings'].get('space') for a in analyses}   # a column of its own only where the runs differ in it
    space = (lambda a: [a['settings'].get('space')]) if len(spaces) > 1 else (lambda a: [])
    md = []
    for key, caption in metrics:
        header = ['run', *(['space'] if len(spaces) > 1 else []), 'method', 'patch'] + column
        rows = []
        for a in analyses:
            if key == 'grid':
                values = (['{}x{} ({})'.format(*c['grid'], c['type']) for c in a['cells']]
                          + [''] * (n_cells - len(a['cells'])))
            else:
                values = [fmt(c[key]) for c in a['cells']] + ['–'] * (n_cells - len(a['cells']))
                values.append(fmt(a['summary'][key]))
            rows.append([a['name'] + unfinished(a), *space(a), *method_patch(a['settings'])] + values)
        if key != 'grid':
            for group in groups:
                values = [mean_std([c['cells'][i][key] for c in group if i < len(c['cells'])], 4)
                          for i in range(n_cells)] + [mean_std([c['summary'][key] for c in group], 4)]
                rows.append([f"mean ± std of {', '.join(a['name'] + unfinished(a) for a in group)}", *space(group[0]),
                             *method_patch(group[0]['settings'])] + values)
        md.append(f'**{caption}**\n\n' + table(header + ([] if key == 'grid' else ['mean']), rows))
    return '\n'.join(md)


# ---------------------------------------------------------------------------------------------

def pick(spec, n, what):
    """'0,2' -> [0, 2]; None -> all of range(n)."""
    if spec is None:
        return list(range(n))
    try:
        out = [int(s) for s in spec.split(',') if s.strip()]
    except ValueError:
        raise RunError(f"--{what} wants comma-separated indices like 0,1, not '{spec}'") from None
    if not out or any(not 0 <= i < n for i in out):
        raise RunError(f'--{what} {spec}: this run has {n} {what}, numbered 0..{n - 1}')
    return out


def run_genotype(run, space):
    """The run's final genotype, else the last one its history decoded, else None (a run just begun)."""
    final, history = os.path.join(run, 'genotype.json'), os.path.join(run, 'history.json')
    try:
        if os.path.isfile(final):
            genotype = genotype_from_json(read_json(final))[0]
        else:
            epochs = read_json(history) if os.path.isfile(history) else []
            genotype = genotype_from_json(epochs[-1]['genotype'])[0] if epochs else None
    except (KeyError, TypeError, IndexError):
        raise RunError(f"'{run}': its genotype.json or history.json is not one search.py wrote") from None
    if genotype is not None:
        validate_genotype(genotype, space)
    return genotype


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201 results of several runs (search.py --nb201-table): one row per setting, mean +- std

SETTING_KEYS = ('method', 'patch', 'topology', 'token', 'token_norm', 'edge_norm', 'tau', 'attn_dim', 'key_offset',
                'token_before_bn', 'score_bias', 'share_attention', 'token_bn', 'decorrelate', 'decorrelate_free',
                'detach_mixing', 'mim', 'mean_shift', 'arch_warmup', 'aux_skip', 'unrolled', 'arch_lr', 'epochs',
                'init_channels', 'cells', 'subset', 'dataset', 'select')
# keys that mean nothing unless another one is on: NOT_USED then, so that runs differing in them group together
NOT_USED = '(not used)'
UNUSED_UNLESS = {'select_samples': lambda s: s.get('select') == 'perturb',
                 # a static table decodes from one batch (search.decode_batches), whatever the decode sizes
                 **{k: lambda s: s.get('method') == 'midas' for k in ('decode_samples', 'epoch_decode_samples')},
                 # NB201's rule alone: a DARTS-style node never keeps 'none' (METHOD.md §8)
                 # (a space no longer in SPACES counts as NB201-kind: its rows are kept apart)
                 'decode_none': lambda s: s.get('select') == 'weights'
                 and SPACES.get(s.get('space', 'nb201'), {}).get('kind', 'nb201') == 'nb201',
                 'edge_norm': lambda s: s.get('token_norm', True),   # a no-op without --token-norm
                 **{k: lambda s: s.get('mim') for k in ('mim_ratio', 'mim_patch')},
                 **{k: lambda s: s.get('mean_shift') for k in ('ms_iters', 'ms_samples', 'ms_eps', 'ms_bandwidth',
                                                               'ms_reference')}}


def flag_used(key, s):
    """Whether settings s read the flag key (UNUSED_UNLESS; every other flag always)."""
    return UNUSED_UNLESS.get(key, lambda s: True)(s)


# runs older than a flag ran without it, whatever today's default: they group with 'off' here, and search.py
# --resume rebuilds them so (mean-shift and the warm-up came together: older runs had neither)
SETTING_OFF = {'mim': 0.0, 'mean_shift': False, 'arch_warmup': 0, 'unrolled': False, 'key_offset': False,
               'token_before_bn': False, 'score_bias': False, 'share_attention': False, 'detach_mixing': False,
               'edge_norm': False, 'aux_skip': False, 'token_bn': False, 'decorrelate': False,
               'decorrelate_free': False, 'nesterov': False, 'ms_reference': False}


@functools.cache   # search.py's flags do not change while this runs
def training_flags():
    """-> (the rest of what a search's result depends on besides SETTING_KEYS: search.py's CONFIG_KEYS less the
    space, depth and seed, plus how removal chose; search.py's defaults of every flag). Read from search.py, which
    imports this file (so not at the top), that a flag added there is grouped on here too."""
    import search
    keys = tuple(k for k in search.CONFIG_KEYS if k not in SETTING_KEYS and k not in ('space', 'layers', 'seed'))
    return keys + ('select_samples',), vars(search.get_args([]))


def with_older_flags(settings):
    """A run's settings with SETTING_OFF's value for every flag it does not record: a run older than a flag ran
    without it, whatever today's default."""
    return {**SETTING_OFF, **settings}


def as_ran(settings):
    """with_older_flags(settings), and search.py's default for every training flag (training_flags) the run does
    not record."""
    keys, defaults = training_flags()
    return {**{k: defaults[k] for k in keys}, **with_older_flags(settings)}


# MIDAS's own flags, named in a setting when they differ from ArchConfig's defaults
MIDAS_LABELS = {'token': lambda v: f' token {v}', 'token_norm': lambda v: ' no-LN',
                'edge_norm': lambda v: ' token-wise LN', 'tau': lambda v: f' tau {v:g}',
                'attn_dim': lambda v: f' attn-dim {v}', 'key_offset': lambda v: ' key-offset',
                'token_before_bn': lambda v: ' token before BN', 'score_bias': lambda v: ' score-bias',
                'share_attention': lambda v: ' shared attention', 'token_bn': lambda v: ' token-bn',
                'decorrelate': lambda v: ' decorrelated', 'decorrelate_free': lambda v: ' decorrelated free'}

# flags that change nothing for --method darts: darts runs group whatever they were given
MIDAS_ONLY = ('patch', *MIDAS_LABELS, 'detach_mixing')


def setting_name(s):
    name = s['method'] + (f" patch {s['patch']}" if s['method'] == 'midas' else '')
    if s['method'] == 'midas':
        for key, label in MIDAS_LABELS.items():
            default = getattr(ArchConfig, key)
            if s.get(key, default) != default and flag_used(key, s):
                name += label(s[key])
    if s.get('arch_lr', 3e-4) != 3e-4:
        name += f" arch-lr {s['arch_lr']:g}"
    if s.get('mim'):
        name += f" + mim {s['mim']:g}"
    if s.get('mean_shift'):
        name += ' + mean-shift'
    if s.get('aux_skip'):
        name += ' + aux-skip'
    if s.get('select', 'weights') != 'weights':
        name += f" select {s['select']}"
    if s['method'] == 'midas' and s.get('detach_mixing'):   # off by default, as the flags above
        name += ' detach-mixing'
    if s.get('arch_warmup') not in (None, default_warmup(s)):
        name += f" arch-warmup {s['arch_warmup']}"
    if s.get('unrolled'):
        name += ' + unrolled'
    if s.get('dataset', 'cifar10') != 'cifar10':
        name += f" on {s['dataset']}"
    return name


def default_warmup(s):
    """search.py's --arch-warmup when not given: 5 epochs with mean-shift, else none."""
    return 5 if s.get('mean_shift') else 0


def budget_name(s):
    """The search budget of a run's settings: epochs, channels, cells per stage, images."""
    n = s.get('subset')
    images = 'all img' if not n else f'{n // 1000}k img' if n % 1000 == 0 else f'{n:,} img'
    return f"{s.get('epochs')} ep, {s.get('init_channels')} ch, {s.get('cells')} cell/stage, {images}"


def mean_std(values, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return '–'
    a = np.array(values, dtype=float)
    return f'{a.mean():.{digits}f} ± {a.std():.{digits}f}' if len(a) > 1 else f'{a[0]:.{digits}f}'


# NAS-Bench-201's protocol reports the cell found on one dataset (CIFAR-10) on the benchmark's two others too
NB201_DATASETS = {'cifar10': 'CIFAR-10', 'cifar100': 'CIFAR-100', 'imagenet16-120': 'ImageNet16-120'}
SPLITS = ('valid', 'test')


def transfer_cells(finals, datasets):
    """Mean ± std of the runs' final cells on each of datasets, valid then test; '–' where a run was not scored
    on it (a run older than these scores, read without --nb201-table)."""
    cells = []
    for dataset in datasets:
        for split in SPLITS:
            values = [f.get('nb201_datasets', {}).get(dataset, {}).get(split) for f in finals]
            cells.append(mean_std(values) if None not in values else '–')
    return cells


def nb201_results(runs, table_path=None, nb201_table=None):
    """-> (Markdown table of final valid/test by setting, with per-epoch mean test trajectories). The final cells'
    accuracies, on the searched dataset and on NAS-Bench-201's two others, are read from table_path
    (search.py --nb201-table) when given, else from genotype.json where search.py wrote them."""
    groups, seen = {}, {}
    import search   # imports this file: not at the top
    if table_path and nb201_table is None:   # nb201_table: the table at table_path, read already
        nb201_table = search.load_nb201_table(table_path)
    training_keys, defaults = training_flags()   # a table names them only where its rows differ in them
    for run in dict.fromkeys(os.path.realpath(r) for r in runs):   # a folder named twice counts once
        settings = read_json(os.path.join(run, 'args.json'))
        if not isinstance(settings, dict) or 'method' not in settings or type(settings.get('seed')) is not int:
            raise RunError(f"'{run}' holds no search.py run (its args.json lacks the method and seed)")
        settings = as_ran(settings)
        history = read_json(os.path.join(run, 'history.json'))
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise RunError(f"'{run}': its history.json is not one search.py wrote (a list of epochs)")
        final_path = os.path.join(run, 'genotype.json')
        final = read_json(final_path) if os.path.isfile(final_path) else None
        if not final or 'arch' not in final:
            raise RunError(f"'{run}' has no finished NAS-Bench-201 search (no arch in its genotype.json)")
        if 'nb201' not in final and not table_path:
            raise RunError(f"'{run}' was searched without --nb201-table: give analyze.py nb201 --nb201-table T")
        if not table_path and not (isinstance(final['nb201'], dict) and all(
                isinstance(s, dict) for s in [final['nb201'], *dict(final.get('nb201_datasets', {})).values()])):
            raise RunError(f"'{run}': its genotype.json is not one search.py wrote (its nb201 scores)")
        if table_path:   # every column from the one table, the searched dataset's and each epoch's too: a row
            final['nb201_datasets'] = search.nb201_scores(nb201_table, final.get('arch'))   # mixes no two tables
            dataset = settings.get('dataset', 'cifar10')
            final['nb201'] = search.nb201_score(nb201_table, final.get('arch'), dataset)   # as search.py scores it
            if final['nb201'] is None:
                raise RunError(f"'{run}': its cell {final.get('arch')} has no {dataset} score in '{table_path}'")
            for entry in history:
                arch = (entry.get('genotype') or {}).get('arch')
                entry['nb201'] = search.nb201_score(nb201_table, arch, dataset)
        # how the cell was chosen: a finished run resumed with another --select, or re-decoded, chose again
        settings['select'] = final.get('select', 'weights')
        epoch_rule = settings.get('decode_none')   # the rule every epoch of history.json was decoded with
        settings.update({k: final[k] for k in ('decode_none', 'select_samples') if k in final})
        ignored = [*(MIDAS_ONLY if settings['method'] != 'midas' else ()), 'topology']   # NB201 nodes have no pairs
        key = tuple(None if k in ignored else settings.get(k) if flag_used(k, settings) else NOT_USED
                    for k in (*SETTING_KEYS, *training_keys))
        twin = seen.setdefault((key, settings['seed']), run)
        if twin != run:   # a mean over seeds must not count one seed twice
            raise RunError(f"'{twin}' and '{run}' are the same setting and seed: give one of them")
        group = groups.setdefault(key, {'settings': settings, 'runs': [], 'epoch_rules': set()})
        group['runs'].append((settings['seed'], final, history))
        if settings['select'] == 'weights' and epoch_rule != settings.get('decode_none'):   # re-decoded since
            group['epoch_rules'].add(epoch_rule)
    # a training flag that differs between the rows is named where it is not search.py's default (the rows would
    # read as one setting twice); one that all rows share, such as the README recipe's decode sizes, is not
    varying = [(i, k) for i, k in enumerate(training_keys, len(SETTING_KEYS))
               if len({key[i] for key in groups} - {NOT_USED}) > 1]
    searched = {g['settings'].get('dataset', 'cifar10') for g in groups.values()}
    others = [d for d in NB201_DATASETS if d not in searched or len(searched) > 1]   # all three for a mixed table
    transferred = any(d in f.get('nb201_datasets', {}) for g in groups.values() for _, f, _ in g['runs']
                      for d in others)
    rows = []
    for key, g in groups.items():
        s, runs_ = g['settings'], sorted(g['runs'], key=lambda r: r[0])
        name = setting_name(s) + ''.join(f" {k.replace('_', '-')} {key[i]}" for i, k in varying
                                         if key[i] not in (NOT_USED, defaults[k]))
        epochs = min(len(h) for _, _, h in runs_)
        # an epoch some run did not score (--nb201-table added on --resume) is '–', not the mean of the others
        trajectory = ' → '.join(mean_std(tests).split(' ±')[0] if None not in tests else '–'
                                for tests in ([(h[e].get('nb201') or {}).get('test') for _, _, h in runs_]
                                              for e in range(epochs)))
        if g['epoch_rules']:   # history.json keeps cells, not weights: --redecode could not decode its epochs again
            trajectory += f" (epochs decoded with --decode-none {'/'.join(sorted(g['epoch_rules']))})"
        eigs = [[h[e].get('hessian_eig') for _, _, h in runs_] for e in range(epochs)]
        rough = [any(h[e].get('hessian_settled') is False for _, _, h in runs_) for e in range(epochs)]
        curvature = ' → '.join(('~' if r else '') + f'{np.mean(v):.3g}' if None not in v else '–'
                               for v, r in zip(eigs, rough))
        rows.append([name, budget_name(s), ','.join(str(seed) for seed, _, _ in runs_),
                     mean_std([f['nb201']['valid'] for _, f, _ in runs_]),
                     mean_std([f['nb201']['test'] for _, f, _ in runs_]),
                     *(transfer_cells([f for _, f, _ in runs_], others) if transferred else []), trajectory, curvature])
    # every epoch decodes by §8's weights; --select perturb chooses the final cell by removal
    header = ['setting', 'budget', 'seeds', 'NB201 valid', 'NB201 test',
              *([f'{NB201_DATASETS[d]} {split}' for d in others for split in SPLITS] if transferred else []),
              'mean test by epoch (§8 weights)',
              "mean Hessian eigenvalue by epoch (--hessian-samples; ~ a run's power iteration had not settled)"]
    if not any('hessian_eig' in e for g in groups.values() for _, _, h in g['runs'] for e in h):   # none measured it
        header, rows = header[:-1], [row[:-1] for row in rows]
    return table(header, rows)


MAX_MOSAIC_IMAGES = 64


def get_args(argv=None):
    p = Parser(description='Cell diagrams, mosaic maps and weight statistics of MIDAS / DARTS searches')
    sub = p.add_subparsers(dest='command', required=True, metavar='{diagram,mosaic,report,compare,nb201}')
    d = sub.add_parser('diagram', help='DOT (and SVG/PNG with Graphviz) diagrams of a genotype')
    d.add_argument('--genotype', required=True,
                   help='genotype.json, a published name (DARTS_V2), a Genotype(...) literal or an NB201 arch string')
    d.add_argument('--out', default='.', help='folder for the files (default: the current one)')
    d.add_argument('--prefix', default='', help='prefix of the file names')
    for name, help_ in (('mosaic', 'PNG maps of the winning op per patch'),
                        ('report', 'weight statistics, diagrams and mosaics into RUN/analysis')):
        s = sub.add_parser(name, help=help_)
        s.add_argument('--run', required=True, help='folder of a search.py run')
        s.add_argument('--data', default=None, help="dataset root (default: the run's --data)")
        s.add_argument('--download', action=argparse.BooleanOptionalAction, default=False,
                       help='fetch CIFAR when absent from --data (off: the run already has its data)')
        s.add_argument('--split', default='test', choices=['test', 'train'],
                       help='the dataset split the images come from (default %(default)s)')
        s.add_argument('--images', type=int, default=4, help='images per mosaic (at most 64; default %(default)s)')
        s.add_argument('--cells', default=None, help='search cells to draw, e.g. 0,1 (default all)')
        s.add_argument('--edges', default=None, help='edges to draw, e.g. 0,3 in edge order (default all)')
        s.add_argument('--out', default=None, help='output folder (default RUN/analysis)')
        s.add_argument('--batch-size', type=int, default=256,   # search.py's DECODE_BATCH
                       help="images per forward (default %(default)s, as search.py decodes: the weights of "
                            "--token-bn and --decorrelate runs depend on the batch)")
        s.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
        if name == 'report':
            s.add_argument('--samples', type=int, default=512, help='images the statistics are taken over (at least 4; '
                           'default %(default)s)')
            s.add_argument('--bins', type=int, default=10, help='histogram bins (default %(default)s)')
    c = sub.add_parser('compare', help='Markdown table of the discrimination per cell of several reported runs, '
                                       'with the mean +- std of the runs that differ in their seed alone')
    c.add_argument('runs', nargs='+', help='run folders (with analysis/analysis.json) or analysis.json files')
    c.add_argument('--out', default=None, help='also write the table to this Markdown file')
    n = sub.add_parser('nb201', help='mean +- std of the NAS-Bench-201 accuracy of searched cells, by setting')
    n.add_argument('runs', nargs='+', help='run folders of search.py --space nb201 --nb201-table ...')
    n.add_argument('--nb201-table', default=None,
                   help="NAS-Bench-201 CSV: score each run's final cell from it, on CIFAR-100 and ImageNet16-120 too "
                        '(search.py writes these scores into genotype.json; runs older than that need the table)')
    n.add_argument('--out', default=None, help='also write the table to this Markdown file')
    args = p.parse_args(argv)
    for k in ('images', 'batch_size', 'bins'):
        if getattr(args, k, 1) < 1:
            raise RunError(f"--{k.replace('_', '-')} must be at least 1")
    if getattr(args, 'samples', 4) < 4:   # Sarle's b needs four: with fewer every op would count as unimodal
        raise RunError('--samples must be at least 4 (the bimodality coefficient needs four images)')
    if getattr(args, 'images', 1) > MAX_MOSAIC_IMAGES:   # one panel row per image: a huge PNG past this
        raise RunError(f'--images: a mosaic holds at most {MAX_MOSAIC_IMAGES} images')
    return args


def main(argv=None):
    args = get_args(argv)
    if args.command == 'diagram':
        genotype, _ = load_genotype(args.genotype)
        for path in write_diagrams(genotype, args.out, args.prefix):
            print(f'wrote {path}')
        return
    if args.command in ('compare', 'nb201'):
        if args.command == 'nb201':
            import search   # imports this file: not at the top
            table = search.load_nb201_table(args.nb201_table) if args.nb201_table else None
            for run in args.runs:   # each alone first: a run whose files search.py did not write is named
                try:
                    nb201_results([run], args.nb201_table, table)
                except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
                    raise RunError(f"'{run}': its args.json, genotype.json or history.json is not one search.py "
                                   f"wrote ({type(e).__name__}: {e})") from None
        if args.command == 'compare':
            analyses = [load_analysis(r) for r in args.runs]
            for run, analysis in zip(args.runs, analyses):   # each alone first: a bad one is named
                try:
                    compare_markdown([analysis])
                except (KeyError, TypeError, IndexError, AttributeError, StopIteration, ValueError) as e:
                    raise RunError(f"'{run}' holds no analysis.json of `analyze.py report` ({type(e).__name__}: "
                                   f"{e})") from None
            text = compare_markdown(analyses)
        else:
            text = nb201_results(args.runs, args.nb201_table, table)
        print(text)
        if args.out:
            write_bytes(args.out, text.encode())
            print(f'wrote {args.out}')
        return text

    model, settings = load_run(args.run, pick_device(args.device))
    genotype = run_genotype(args.run, settings['space']) if args.command == 'report' else None   # before any file
    midas = settings['method'] == 'midas'
    if args.command == 'mosaic' and not midas:
        raise RunError(f"no mosaics for '{args.run}': a --method {settings['method']} run has one static weight per "
                       "op for every image and patch (analyze.py report still works)")
    out = args.out or os.path.join(args.run, 'analysis')
    cells = pick(args.cells, len(model.search_cells()), 'cells')
    edges = pick(args.edges, len(model.search_cells()[0]._ops), 'edges')
    n = args.images if args.command == 'mosaic' else args.samples  # mosaics: the first --images of them
    raw, x, y = load_images(settings, args.data, args.split, n, args.download)
    records = record_weights(model, x, args.batch_size, keep_maps=args.images if midas else 0)
    name = os.path.basename(os.path.normpath(args.run))
    mosaics = write_mosaics(records, raw[:args.images], y[:args.images], cells, edges, out, name) if midas else []
    for path in mosaics:
        print(f'wrote {path}')
    if args.command == 'mosaic':
        return mosaics

    cell_stats = analyse(records, y.numpy(), args.bins)
    diagrams = write_diagrams(genotype, out) if genotype is not None else []
    ran = as_ran(settings)   # with the training flags: compare's seed groups are runs that differ in the seed alone
    analysis = {'name': name, 'run': args.run, 'split': args.split, 'samples': len(y), 'batch_size': args.batch_size,
                'epoch': settings['checkpoint_epoch'],
                'settings': {k: ran.get(k) for k in ('space', *SETTING_KEYS, 'layers', 'seed', *training_flags()[0])},
                'summary': summarise([e for c in cell_stats for e in c['edges']]), 'cells': cell_stats}
    write_json(os.path.join(out, 'analysis.json'), analysis)
    write_bytes(os.path.join(out, 'report.md'), report_markdown(analysis, diagrams, mosaics, genotype).encode())
    for path in diagrams + [os.path.join(out, 'analysis.json'), os.path.join(out, 'report.md')]:
        print(f'wrote {path}')
    return analysis


if __name__ == '__main__':
    run_cli(main)
