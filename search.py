"""Bilevel MIDAS / DARTS search (METHOD.md §7) and decoding (§8).

    python search.py --space darts --patch 4                 # MIDAS, DARTS space, CIFAR-10
    python search.py --space nb201 --nb201-table nb201_accuracies.csv
    python search.py --space darts --method darts            # the static-alpha baseline
    python search.py --resume RUN                            # continue a killed run, with its own flags

Writes into the run folder: log.txt, args.json, history.json (the genotype decoded at every epoch),
genotype.json, weights.json (the averaged weights it was decoded from, with margins), the cell diagrams
(.dot; .svg and .png with Graphviz), checkpoint.pt.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from analyze import MIDAS_ONLY, SETTING_OFF, write_diagrams
from data import DATASETS, GPULoader, split_indices
from genotypes import cell_types, decode_darts, decode_nb201, genotype_to_json, get_space, node_inputs, node_pairs
from model import (ArchConfig, MIMDecoder, SearchNetwork, average_weights, aux_skip_weight, mask_patches, mim_loss,
                   twice_differentiable)
from ops import Noise
from train import (Logger, Parser, RunError, Throughput, all_reduce_mean, amp_setup, default_run_folder,
                   fenced_random, load_checkpoint, no_run_to_resume, reduce_sum, refuse_lost_checkpoint,
                   refuse_other_config, restoring, resume_folder, rng_states, run_cli, save_checkpoint,
                   seed_everything, set_rng_states, setup_distributed, started_with, training_images, write_json)

# Flags that change the model, the data or the schedule: a checkpoint must agree on all of them.
CONFIG_KEYS = ['space', 'method', 'patch', 'topology', 'attn_dim', 'tau', 'token', 'token_norm', 'edge_norm',
               'key_offset', 'token_before_bn', 'score_bias', 'share_attention', 'token_bn', 'decorrelate',
               'decorrelate_free', 'dataset', 'init_channels', 'layers', 'cells', 'subset', 'train_portion', 'seed',
               'batch_size', 'epochs', 'unrolled', 'lr', 'lr_min',
               'arch_lr', 'arch_warmup', 'mim', 'mim_ratio', 'mim_patch', 'mean_shift', 'ms_iters', 'ms_samples',
               'ms_eps', 'ms_bandwidth', 'ms_reference', 'detach_mixing', 'aux_skip', 'momentum', 'nesterov',
               'weight_decay', 'grad_clip', 'arch_weight_decay', 'epoch_decode_samples', 'decode_samples',
               'decode_none']
# flags newer than some runs, with the value those were run with, as analyze.py groups them (a checkpoint older
# than a key that its run's args.json holds is checked against args.json)
ADDED_KEYS = SETTING_OFF


def get_args(argv=None):
    p = Parser(description='MIDAS / DARTS architecture search')
    p.add_argument('--data', default='./data',
                   help='dataset root (CIFAR is downloaded here when absent; default %(default)s)')
    p.add_argument('--save', default=None, help='run folder (default runs/search-SPACE-METHOD-TIME-PID)')
    p.add_argument('--download', action=argparse.BooleanOptionalAction, default=True,
                   help='fetch CIFAR from its official URL when absent from --data (default %(default)s)')
    p.add_argument('--dataset', default='cifar10', choices=['cifar10', 'cifar100', 'svhn', 'imagenet16-120'],
                   help='(default %(default)s)')
    p.add_argument('--space', default='darts', help='darts, s1, s2, s3, s4 or nb201 (default %(default)s)')
    # the MIDAS flags default to ArchConfig's fields, which check_args turns them back into
    p.add_argument('--method', default=ArchConfig.method,
                   help='midas (attention) or darts (static alpha; default %(default)s)')
    p.add_argument('--patch', type=int, default=ArchConfig.patch,
                   help='patch side in pixels: a grid of H // PS cells per side of an H x H map (uneven patches where '
                        'PS does not divide H), one cell where PS > H; 0 = global pooling (default %(default)s)')
    p.add_argument('--topology', action=argparse.BooleanOptionalAction, default=None,
                   help='pair-of-edges node (default: on for midas, off for darts; never for nb201)')
    p.add_argument('--attn-dim', type=int, default=ArchConfig.attn_dim,
                   help='query/key dimension d, §3 (default %(default)s)')
    p.add_argument('--tau', type=float, default=ArchConfig.tau, help='score temperature, §3 (default %(default)s)')
    p.add_argument('--token', default=ArchConfig.token, choices=['mean', 'meanstd'],
                   help="patch token: mean only (§2) or mean and spread (breaks the skip/avg-pool tie, §12) "
                        "(default %(default)s)")
    p.add_argument('--token-norm', action=argparse.BooleanOptionalAction, default=ArchConfig.token_norm,
                   help='LayerNorm on query/key tokens (default %(default)s)')
    p.add_argument('--edge-norm', action=argparse.BooleanOptionalAction, default=ArchConfig.edge_norm,
                   help="with --token-norm: normalise an edge's key tokens together, which keeps each candidate's "
                        "scale relative to the others (tells skip from avg-pool); --no-edge-norm: each token alone "
                        "(default %(default)s)")
    p.add_argument('--key-offset', action=argparse.BooleanOptionalAction, default=ArchConfig.key_offset,
                   help='a learned offset on each candidate key (breaks ties of equal tokens; a deviation; '
                        'default %(default)s)')
    p.add_argument('--token-before-bn', action=argparse.BooleanOptionalAction, default=ArchConfig.token_before_bn,
                   help="read each candidate's token before its final BN (keeps the convs' batch mean, §12; "
                        "default %(default)s)")
    p.add_argument('--score-bias', action=argparse.BooleanOptionalAction, default=ArchConfig.score_bias,
                   help="a learned scalar on each candidate's score, per node: DARTS's alpha inside MIDAS "
                        "(a deviation; default %(default)s)")
    p.add_argument('--share-attention', action=argparse.BooleanOptionalAction, default=ArchConfig.share_attention,
                   help="one attention per node for all the cells of a stage, as DARTS's alpha is one per cell type "
                        "(a deviation: §3 gives each cell its own; default %(default)s)")
    p.add_argument('--token-bn', action=argparse.BooleanOptionalAction, default=ArchConfig.token_bn,
                   help="standardise the tokens of skip and NB201's avg-pool by their input's batch mean and std, as "
                        "a BN standardises every other candidate's map: their tokens stop growing with depth and so "
                        "stop taking the larger scores (default %(default)s)")
    p.add_argument('--decorrelate', action=argparse.BooleanOptionalAction, default=ArchConfig.decorrelate,
                   help="each candidate's mean score over the batch and patches is the mean query's against its mean "
                        "key, each input's and patch's deviation kept: the query-key covariance, in which the identity "
                        "(its key is the node's input, as the query is) matches itself, no longer scores (a deviation; "
                        "default %(default)s)")
    p.add_argument('--decorrelate-free', action=argparse.BooleanOptionalAction, default=ArchConfig.decorrelate_free,
                   help="--decorrelate for the parameter-free candidates alone (identity, pools), whose keys are made "
                        "of the node's own input: the convolutions keep their covariance with the query (a deviation; "
                        "default %(default)s)")
    p.add_argument('--detach-mixing', action=argparse.BooleanOptionalAction, default=False,
                   help="weight step: the mixing weights are constants, as DARTS's alpha, and MIDAS's operations are "
                        "not trained to steer the attention on the weights' split (default: the whole gradient)")
    p.add_argument('--aux-skip', action=argparse.BooleanOptionalAction, default=False,
                   help="DARTS- (Chu et al. 2021): add to every node each of its stride-1 inputs, outside the searched "
                        "mixture, weighted 1 in the first epoch and decayed linearly to 0 in the last, so that skip "
                        "candidates stop winning as the deep supernet's gradient highway (default %(default)s)")
    p.add_argument('--unrolled', action='store_true', help='second-order architecture step')
    p.add_argument('--arch-warmup', type=int, default=None,
                   help='epochs of weight steps only before architecture steps start (default 5 with '
                        '--mean-shift, else 0)')
    # The sources' other methods (METHOD.md §11), for midas and darts alike
    p.add_argument('--mim', type=float, default=0.0, metavar='WEIGHT',
                   help='masked image modelling (alpha-DARTS): weight of the reconstruction loss '
                        '(0 = off, the default)')
    p.add_argument('--mim-ratio', type=float, default=0.5, help='share of patches masked (default %(default)s)')
    p.add_argument('--mim-patch', type=int, default=4, help='side of a masked patch in pixels (default %(default)s)')
    p.add_argument('--mean-shift', action='store_true', help='mean-shift sampling of the mixing weights (MS-DARTS)')
    p.add_argument('--ms-iters', type=int, default=2, help='mean-shift rounds T (default %(default)s)')
    p.add_argument('--ms-samples', type=int, default=3, help='points per round N (default %(default)s)')
    p.add_argument('--ms-eps', type=float, default=0.25,
                   help="half-width of the sampling box, grown as MS-DARTS's is: a tenth of it at the first epoch, "
                        "linearly towards it (default %(default)s)")
    p.add_argument('--ms-bandwidth', type=float, default=1.0, help='Gaussian kernel bandwidth h (default %(default)s)')
    p.add_argument('--ms-reference', action=argparse.BooleanOptionalAction, default=True,
                   help="mean-shift as MS-DARTS's code does it (default): points in eval mode, clipped, a kernel per "
                        "cell type, a growing box; --no-ms-reference: this code's variant until 2026-12-07 (train "
                        "mode, unclipped, one kernel, a fixed box), which runs started before then resume with")
    p.add_argument('--epochs', type=int, default=50, help='(default %(default)s)')
    p.add_argument('--batch-size', type=int, default=64, help='(default %(default)s)')
    p.add_argument('--init-channels', type=int, default=16,
                   help='channels of the first stage (default %(default)s)')
    p.add_argument('--layers', type=int, default=8, help='cells of a DARTS-style supernet (default %(default)s)')
    p.add_argument('--cells', type=int, default=5, help='cells per stage of the NB201 supernet (default %(default)s)')
    p.add_argument('--subset', type=int, default=0, help='use only the first N training images (0 = all, the default)')
    p.add_argument('--train-portion', type=float, default=0.5,
                   help='share of the training images that train the weights; the rest train the architecture '
                        '(default %(default)s)')
    p.add_argument('--lr', type=float, default=0.025,
                   help='weight lr, cosine-annealed to --lr-min (default %(default)s)')
    p.add_argument('--lr-min', type=float, default=0.001, help='(default %(default)s)')
    p.add_argument('--momentum', type=float, default=0.9, help='(default %(default)s)')
    p.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=False,
                   help="Nesterov momentum in the weight step (NAS-Bench-201's own searches: --nesterov "
                        '--weight-decay 5e-4; default %(default)s)')
    p.add_argument('--weight-decay', type=float, default=3e-4, help='(default %(default)s)')
    p.add_argument('--grad-clip', type=float, default=5.0,
                   help='gradient norm clip of the weight step; 0 = off (default %(default)s)')
    p.add_argument('--arch-lr', type=float, default=3e-4,
                   help='Adam lr of the architecture step (default %(default)s)')
    p.add_argument('--arch-weight-decay', type=float, default=1e-3, help='(default %(default)s)')
    p.add_argument('--decode-samples', type=int, default=0,
                   help='the first N images of the search-train split make the final decode (0 = all, the default)')
    p.add_argument('--epoch-decode-samples', type=int, default=2048,
                   help='the first N images of the search-train split make each epoch\'s decode (0 = all; '
                        'default %(default)s)')
    p.add_argument('--decode-none', default='exclude', choices=['exclude', 'include'],
                   help="NB201 decoding: may 'none' win an edge? (METHOD.md §8 includes it; see README; "
                        "default %(default)s)")
    p.add_argument('--select', default='weights', choices=['weights', 'perturb'],
                   help="how the final cell is chosen: 'weights', METHOD.md §8 (the largest averaged weights); "
                        "'perturb', the candidates, and in DARTS-style spaces the pairs of edges, whose removal "
                        "raises the supernet's search-val loss the most (DARTS-PT, one shot; a deviation). Only the "
                        "end of a search changes: a finished run resumed with another --select chooses again "
                        "(default %(default)s)")
    p.add_argument('--select-samples', type=int, default=2048,
                   help='the first N images of the search-val split measure --select perturb (0 = all; '
                        'default %(default)s)')
    p.add_argument('--hessian-samples', type=int, default=0, metavar='N',
                   help="after each epoch, the largest eigenvalue (in magnitude) of the Hessian of the search-val "
                        "loss in the architecture parameters, on the first N search-val images, into history.json "
                        "(RobustDARTS's sign of a coming collapse; it leaves the search as it is: 0 = off, "
                        "the default)")
    p.add_argument('--redecode', default=None, metavar='RUN',
                   help="decode RUN/weights.json again (with --decode-none, --nb201-table) and rewrite "
                        "RUN/genotype.json")
    p.add_argument('--nb201-table', default=None, help='CSV of NAS-Bench-201 accuracies to score NB201 cells')
    p.add_argument('--seed', type=int, default=0, help='(default %(default)s)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N (default %(default)s)')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'off'],
                   help='autocast (auto: bf16 on a CUDA GPU that has it, else off; default %(default)s)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the supernet (default off; --no-compile turns a resumed run\'s off)')
    p.add_argument('--report-freq', type=int, default=50, help='log every N iterations (default %(default)s)')
    p.add_argument('--resume', default=None, metavar='RUN',
                   help="continue the run in folder RUN with the flags it was started with (from RUN/args.json); "
                        "a flag given now must agree with them, except --data, --download, --device, --amp, "
                        "--compile, --report-freq, --nb201-table (another machine, another path), --select and "
                        "--select-samples (the choice at the end), --hessian-samples (a measurement)")
    args = p.parse_args(argv)
    given = given_flags(p, argv, args) if args.resume or args.redecode else {}
    if args.resume:
        resumed_flags(args, p, given)
    if args.redecode:   # it reads the run's args.json and writes into the run: any other flag would go unheeded
        ignored = [f"--{k.replace('_', '-')}" for k in given
                   if k not in ('redecode', 'resume', 'decode_none', 'nb201_table', 'select')]
        if ignored:
            raise RunError(f"--redecode RUN decodes RUN's averaged weights again, with its own settings, into RUN: "
                           f"leave out {', '.join(ignored)}")
    return args


def given_flags(parser, argv, args):
    """{dest: value} of the flags on the command line alone, argparse's defaults left out."""
    unset = object()   # a namespace pre-filled with it keeps argparse's defaults out: what remains was given
    parsed = vars(parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)})))
    return {k: v for k, v in parsed.items() if v is not unset}


def resumed_flags(args, parser, given):
    """--resume RUN: every flag not on the command line (not in given) takes the value RUN was started with (its
    args.json; a flag newer than the run, the value it ran with: ADDED_KEYS). Given flags stay, for main to check
    against the checkpoint."""
    started = started_with(args.resume, parser, 'search.py')
    if not started:
        return   # no args.json: the defaults, checked against the checkpoint's configuration
    for k, v in {**ADDED_KEYS, **started}.items():   # (a key of no flag today stays out of args)
        if k in vars(args) and k not in given and k not in ('save', 'resume', 'redecode'):
            setattr(args, k, v)
    if 'nb201_table' not in given and args.nb201_table and not os.path.isfile(args.nb201_table):
        args.nb201_table = None   # the run's own table, not on this machine: main says so, and scores nothing


# refused outside NAS-Bench-201 by a fresh search and by --redecode alike
DECODE_NONE_NB201 = ("--decode-none include is NAS-Bench-201's rule: a DARTS-style node never keeps 'none' "
                     "(METHOD.md §8)")


def check_args(args):
    space = get_space(args.space)
    if args.topology and space['kind'] == 'nb201' and not args.resume:   # older runs recorded it, ignored
        raise RunError('--topology does not apply to NAS-Bench-201: its nodes sum every incoming edge (METHOD.md §5)')
    if args.topology is None:
        args.topology = args.method == 'midas' and space['kind'] == 'darts'
    if args.arch_warmup is None:
        args.arch_warmup = 5 if args.mean_shift else 0
    size = DATASETS[args.dataset]['size']
    if args.patch < 0:
        raise RunError('--patch must be 0 (global pooling) or a patch side in pixels')
    if args.patch > size:
        raise RunError(f'--patch {args.patch} is larger than the {size}x{size} images; use 0 for global pooling')
    for name in ('epochs', 'batch_size', 'init_channels', 'layers', 'cells', 'report_freq', 'attn_dim'):
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ('lr', 'arch_lr'):
        if not 0 < getattr(args, name) < math.inf:   # NaN fails this too
            raise RunError(f"--{name.replace('_', '-')} must be positive and finite")
    for name in ('lr_min', 'weight_decay', 'arch_weight_decay', 'grad_clip', 'subset', 'arch_warmup', 'decode_samples',
                 'epoch_decode_samples', 'select_samples', 'hessian_samples'):
        if not 0 <= getattr(args, name) < math.inf:
            raise RunError(f"--{name.replace('_', '-')} must be a finite number, not negative")
    if not 0 <= args.momentum < 1:
        raise RunError('--momentum must be in [0, 1)')
    if args.nesterov and args.momentum == 0:
        raise RunError('--nesterov needs a --momentum above 0')
    if args.nb201_table and space['kind'] != 'nb201' and not args.resume:   # ignored (older runs recorded it)
        raise RunError(f'--nb201-table scores NAS-Bench-201 cells, and --space {args.space} has none: drop it')
    if args.decode_none == 'include' and space['kind'] != 'nb201' and not args.resume:
        raise RunError(f"{DECODE_NONE_NB201}, so --space {args.space} would decode alike: drop it")
    if args.decorrelate and args.decorrelate_free and not args.resume:   # the first holds the second
        raise RunError("--decorrelate takes the covariance out of every candidate's score, the parameter-free ones' "
                       "too: drop --decorrelate-free")
    if args.nb201_table and space['kind'] == 'nb201' and args.dataset not in NB201_COLUMNS:
        raise RunError(f'NAS-Bench-201 has no {args.dataset} results to score cells with: drop --nb201-table')
    if space['kind'] == 'darts' and args.layers < 3:
        raise RunError('--layers must be at least 3 (a DARTS supernet has two reduction cells)')
    if not 0 <= args.mim < math.inf or not 0 <= args.mim_ratio <= 1 or args.mim_patch < 1 or size % args.mim_patch:
        raise RunError(f'--mim needs a weight >= 0, --mim-ratio in [0, 1] and a --mim-patch dividing {size}')
    patches = (size // args.mim_patch) ** 2
    if args.mim and round(args.mim_ratio * patches) == 0 and not args.resume:   # model.mask_patches' count
        raise RunError(f'--mim-ratio {args.mim_ratio} masks none of the {patches} patches of {args.mim_patch}x'
                       f'{args.mim_patch} pixels: the reconstruction loss would be 0, a search without MIM')
    # checked without --mean-shift too, as --mim's: they are part of the run's configuration (a NaN there would
    # never equal itself, and the run could not be resumed)
    if (args.ms_iters < 1 or args.ms_samples < 1 or not 0 <= args.ms_eps < math.inf
            or not 0 < args.ms_bandwidth < math.inf):
        raise RunError('--mean-shift needs --ms-iters >= 1, --ms-samples >= 1, --ms-eps >= 0, --ms-bandwidth > 0')
    if not 0 < args.train_portion < 1:
        raise RunError('--train-portion must be between 0 and 1')
    if args.lr_min > args.lr:
        raise RunError(f'--lr-min {args.lr_min} is above --lr {args.lr}: the cosine schedule anneals down to it')
    if not 0 < args.tau < math.inf:
        raise RunError('--tau must be positive and finite')
    if not 0 <= args.seed < 2 ** 32:
        raise RunError('--seed must be in [0, 2**32)')
    return ArchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ArchConfig)})   # one flag each


# ---------------------------------------------------------------------------------------------
# NAS-Bench-201 table

NB201_COLUMNS = {'cifar10': 'c10', 'cifar100': 'c100', 'imagenet16-120': 'in16'}
NB201_CELLS = 5 ** 6   # five candidates on each of six edges


def load_nb201_table(path, dataset='cifar10'):
    """arch string -> row of floats (columns as in shared/data/nb201_accuracies.csv); the dataset's valid and
    test columns must be there."""
    prefix = NB201_COLUMNS.get(dataset, 'c10')
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        table = {r['arch']: {k: float(v) for k, v in r.items() if k not in ('arch', 'index') and v not in ('', None)}
                 for r in rows}
    except OSError as e:
        raise RunError(f"cannot read --nb201-table '{path}': {e.strerror}") from None
    except (ValueError, KeyError, TypeError, csv.Error) as e:   # a non-number, no arch column, a binary file
        raise RunError(f"'{path}' is not a NAS-Bench-201 table of numbers ({type(e).__name__}: {e})") from None
    if not rows or any(f'{prefix}_{c}' not in rows[0] for c in ('valid', 'test')):
        raise RunError(f"'{path}' is not a NAS-Bench-201 table for {dataset} (needs columns arch, {prefix}_valid, "
                       f"{prefix}_test)")
    if len(table) < NB201_CELLS:   # a truncated copy would leave the cells it lost unscored without a word
        print(f"warning: '{path}' scores {len(table):,} of NAS-Bench-201's {NB201_CELLS:,} cells; a cell it lacks "
              f"goes unscored", file=sys.stderr)
    return table


def nb201_score(table, arch, dataset):
    """{'valid', 'test'} of the NB201 cell `arch` on dataset; None for a DARTS-style genotype, a dataset NAS-Bench-201
    has no columns for, or a cell the table lacks."""
    prefix = NB201_COLUMNS.get(dataset)
    row = table.get(arch) if table and isinstance(arch, str) and prefix else None
    if row is None or f'{prefix}_valid' not in row or f'{prefix}_test' not in row:
        return None
    return {'valid': row[f'{prefix}_valid'], 'test': row[f'{prefix}_test']}


def nb201_scores(table, arch):
    """{dataset: {'valid', 'test'}} for every NAS-Bench-201 dataset the table scores the cell on: the benchmark's
    protocol searches on one dataset (CIFAR-10) and reports the cell it found on all three."""
    return {d: score for d in NB201_COLUMNS if (score := nb201_score(table, arch, d))}


def other_datasets(scores, dataset):
    """' (the same cell on cifar100: valid .. test ..; ...)' for the datasets a search was not run on, or ''."""
    others = [f"{d}: valid {s['valid']:.2f} test {s['test']:.2f}" for d, s in scores.items() if d != dataset]
    return f" (the same cell on {'; '.join(others)})" if others else ''


def use_channels_last(device):
    """Channels-last (NHWC) images and supernet: faster with cuDNN, and on CPU too (oneDNN's depthwise and 1x1
    convolutions; the DARTS-space supernet's iteration is 1.9x faster on 2 cores: BENCHMARKS.md)."""
    return device.type in ('cuda', 'cpu')


def dilated_bf16_grads_ok():
    """Whether this PyTorch's CPU kernel gets the weight gradient of a bfloat16 dilated depthwise convolution
    (DARTS's dil_conv_3x3 and dil_conv_5x5) right on channels-last 32x32 maps, as a search on the CPU runs it.
    torch 2.13.0's does not: 100 % off or NaN, from one call to the next (float32, and NCHW maps, are right)."""
    g = torch.Generator().manual_seed(0)
    x, grad = (torch.randn(1, 8, 32, 32, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2))
    w = torch.randn(8, 1, 3, 3, generator=g)
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = (t.to(dtype, copy=True).requires_grad_() for t in (x, w))
        out = F.conv2d(xd, wd, padding=2, dilation=2, groups=8)
        found.append(torch.autograd.grad(out, (xd, wd), grad.to(dtype))[1].float())   # both, as in a search step
    exact, half = found
    return bool(torch.isfinite(half).all()) and (half - exact).abs().max().item() <= 0.05 * exact.abs().max().item()


def check_amp(args, device):
    """--amp bf16 on the CPU in a space with dilated convolutions: refused where the CPU kernel is wrong (a search
    would learn from garbage gradients, or stop on a NaN loss a few steps in)."""
    if args.amp != 'bf16' or device.type != 'cpu' or not use_channels_last(device):
        return
    space = get_space(args.space)
    if (any(op.startswith('dil_conv') for cell in cell_types(space['kind']) for edge in space[cell] for op in edge)
            and not dilated_bf16_grads_ok()):
        raise RunError(f"--amp bf16 on the CPU: PyTorch {torch.__version__} computes wrong bfloat16 weight gradients "
                       f"for the dilated convolutions of --space {args.space} (dil_conv_*); use --amp off")


def check_compile(args, device):
    """--compile on the CPU: refused on the torch releases whose TorchInductor fails on the supernet's backward,
    minutes into the first step (2.5.1, and 2.6.0's same code: C++ it cannot compile, 'ops.<lambda>'; 2.7.0: a
    KeyError in its scheduler; 2.8.0, 2.9.1, 2.10.0: its vectorised kernels corrupt the heap, glibc aborts).
    2.13.0 compiles it; 2.11 and 2.12 were not tried."""
    if args.compile and device.type == 'cpu' and torch.__version__ < '2.11':
        raise RunError(f'--compile on the CPU needs torch >= 2.11 (TorchInductor {torch.__version__} fails on the '
                       'supernet\'s backward); use --no-compile or a newer torch')


def build_search(args, cfg, num_classes, device, channels_last=None):
    """The supernet (and the MIM decoder with --mim), its optimisers, the forward to call (compiled with
    --compile) and the autocast context, as a search step needs them (bench.py times the same).
    -> (model, mim_decoder or None, arch_params, weights, w_opt, arch_opt, forward, autocast)"""
    channels_last = use_channels_last(device) if channels_last is None else channels_last
    model = SearchNetwork(args.space, args.init_channels, num_classes, args.layers, args.cells, cfg).to(device)
    model.aux_skip = args.aux_skip   # main sets each epoch's weight
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    mim_decoder = MIMDecoder(model.feature_channels, model.feature_stride).to(device) if args.mim else None
    arch_params, weights = model.arch_parameters(), model.weight_parameters()
    if mim_decoder is not None:
        weights += list(mim_decoder.parameters())
    w_opt = torch.optim.SGD(weights, args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                            nesterov=args.nesterov)
    arch_opt = torch.optim.Adam(arch_params, args.arch_lr, betas=(0.5, 0.999), weight_decay=args.arch_weight_decay)
    forward = torch.compile(model) if args.compile else model
    _, autocast, _ = amp_setup(args.amp, device)   # auto: bf16 on a CUDA GPU that has it (not a V100), else off
    return model, mim_decoder, arch_params, weights, w_opt, arch_opt, forward, autocast


# ---------------------------------------------------------------------------------------------
# One search iteration: an architecture step on a search-val batch, then a weight step (§7)

@contextlib.contextmanager
def frozen(params):
    """requires_grad off for params inside the block. autograd.grad and backward(inputs=...) already skip
    the gradients nobody asked for in PyTorch's own ops, but the graph is still recorded for them and a
    custom Function's backward computes every input gradient it was told is required: DARTS's weight step
    would form the mixing weights' gradient (a pass over every candidate map) only to drop it."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def arch_step(model, arch_params, arch_opt, x, y, world, autocast, weights=()):
    """weights: the network's weights, held constant (frozen) for this step."""
    arch_opt.zero_grad(set_to_none=True)
    with frozen(weights):
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        grads = torch.autograd.grad(loss, arch_params)  # the architecture parameters' gradients only
    for p, g in zip(arch_params, grads):
        p.grad = g
    all_reduce_mean(grads, world)
    arch_opt.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def train_loss(model, x, y, mim=None, masking=None, detach_mixing=False):
    """The weight step's loss on a search-train batch -> (loss, logits). With mim, the supernet sees x masked
    (masking: a (masked x, mask) pair from mask_patches, drawn here when None) and the loss adds the
    reconstruction of the masked pixels."""
    if mim is None:
        logits = model(x, detach_mixing=detach_mixing)
        return F.cross_entropy(logits, y), logits
    decoder, mim_weight, ratio, patch, generator = mim
    masked, mask = mask_patches(x, ratio, patch, generator) if masking is None else masking
    logits, fmap = model(masked, features=True, detach_mixing=detach_mixing)
    return F.cross_entropy(logits, y) + mim_weight * mim_loss(decoder(fmap).float(), x, mask), logits


def weight_step(model, weights, w_opt, x, y, grad_clip, world, autocast, mim=None, arch_params=(),
                detach_mixing=False):
    """mim: (decoder, loss weight, mask ratio, mask patch, mask generator or None) adds masked image modelling
    (alpha-DARTS): the supernet sees the masked images and the decoder recovers the masked pixels from its features.
    arch_params: held constant (frozen) for this step. MIDAS's weights still get the gradient through the
    attention (the mixing weights are functions of the candidate maps) unless detach_mixing; only W_q, W_k's
    own is skipped."""
    w_opt.zero_grad(set_to_none=True)
    with frozen(arch_params):
        with autocast():
            loss, logits = train_loss(model, x, y, mim, detach_mixing=detach_mixing)
        loss.backward(inputs=weights)  # the architecture parameters get no gradient here
    all_reduce_mean([p.grad for p in weights], world)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(weights, grad_clip)
    w_opt.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def ms_eps_at(args, epoch):
    """MS-DARTS's sampling half-width at an epoch: --ms-eps / 10 at the first, growing linearly towards --ms-eps
    (its train_search_ms.py); --no-ms-reference's fixed --ms-eps."""
    if not args.ms_reference:
        return args.ms_eps
    return args.ms_eps / 10 + 0.9 * args.ms_eps * epoch / args.epochs


def mean_shift_offsets(model, x, y, args, autocast, world=1, generator=None, eps=None):
    """MS-DARTS's mean-shift sampling (METHOD.md §11), as offsets to the mixing weights the cells use
    (softmax(alpha) for darts; the attention weights for midas, the offset broadcast over samples and
    patches). T rounds: N points drawn within +-eps (default --ms-eps) of the current point, each evaluated in
    eval mode (no BN statistics move) with its weights clipped to the simplex (model.py's clip_weights), and weighted,
    cell type by cell type, by the softmax of the training losses times a Gaussian kernel of its squared distance
    from the centre; move to the weighted mean, unclipped, where the weight step then runs: as MS-DARTS's
    perturb_ms.py. One deviation: the distance is the offset's own, where MS-DARTS measures it to the clipped point
    (a MIDAS point is clipped per image and patch). generator: where the points are drawn from, the same on every
    rank (all ranks must move to one point). With args.ms_reference False, the variant of this code until 2026-12-07:
    points in train mode, unclipped, and one kernel over both cell types' distances."""
    eps = args.ms_eps if eps is None else eps
    reference = args.ms_reference
    types = cell_types(model.kind)
    centre = {t: torch.zeros(len(model.space[t]), len(model.space[t][0]), device=x.device) for t in types}
    # Every point's draw at once, in the order of drawing them one by one, and one copy to the device: a plain copy
    # per point and cell type waits for the GPU to finish each time (12 waits a step at MS-DARTS's defaults).
    sizes = [centre[t].numel() for t in types]
    draws = 2 * torch.rand(args.ms_iters, args.ms_samples, sum(sizes), generator=generator) - 1
    if x.device.type == 'cuda':
        draws = draws.pin_memory()
    draws = draws.to(x.device, non_blocking=True)
    was_training = model.training
    model.train(was_training and not reference)
    model.mix_clip = reference
    try:
        with torch.no_grad():
            for it in range(args.ms_iters):
                points = [{t: centre[t] + eps * d.view_as(centre[t])
                           for t, d in zip(types, draws[it, k].split(sizes))} for k in range(args.ms_samples)]
                losses = []
                for point in points:
                    model.mix_offset = point
                    with autocast():
                        losses.append(F.cross_entropy(model(x), y).float())
                losses = torch.stack(losses)
                all_reduce_mean([losses], world)  # every rank moves to the same point: the global batch's losses
                new = {}
                for kernel_types in ([[t] for t in types] if reference else [types]):   # a kernel per cell type
                    dist2 = torch.stack([sum(((p[t] - centre[t]) ** 2).sum() for t in kernel_types) for p in points])
                    log_kernel = -dist2 / (2 * args.ms_bandwidth ** 2)
                    weight = losses.softmax(0) * torch.exp(log_kernel)
                    # every kernel underflowed (a narrow --ms-bandwidth, many edges): the same normalised weights,
                    # taken in log space, not 0 / 0 (no host sync: both are computed)
                    weight = torch.where(weight.sum() > 0, weight, (losses.log_softmax(0) + log_kernel).softmax(0))
                    for t in kernel_types:
                        new[t] = sum(w * p[t] for w, p in zip(weight / weight.sum(), points))
                centre = new
    finally:
        model.mix_offset, model.mix_clip = None, False
        model.train(was_training)
    return centre


def unrolled_arch_step(model, arch_params, weights, arch_opt, w_opt, batch_val, batch_train, lr, args, world,
                       autocast, mim=None):
    """DARTS's second-order step: the gradient at w' = w - lr * dL_train/dw (the weight optimizer's step: its
    momentum, weight decay and Nesterov too), with the Hessian-vector product by finite differences (eps = 0.01 /
    ||dL_val/dw'||, the two gradients taken without autocast). Weights are restored afterwards. L_train is the
    weight step's loss (with mim, on one masking of the batch for the whole step). With --detach-mixing the virtual
    step takes the weight step's detached gradient, while the finite differences differentiate the whole one: for
    that pair of flags the Hessian term approximates."""
    (x_val, y_val), (x_tr, y_tr) = batch_val, batch_train
    arch_opt.zero_grad(set_to_none=True)
    backup = [p.detach().clone() for p in weights]
    masking = mask_patches(x_tr, *mim[2:]) if mim is not None else None

    def l_train(detach_mixing=False, amp=True):
        with autocast() if amp else torch.autocast(x_tr.device.type, enabled=False):
            return train_loss(model, x_tr, y_tr, mim, masking, detach_mixing)[0]

    with frozen(arch_params):  # the virtual step takes the gradient the real weight step takes
        g_train = torch.autograd.grad(l_train(args.detach_mixing), weights)
    all_reduce_mean(list(g_train), world)
    sgd = w_opt.param_groups[0]   # its own momentum, weight decay and Nesterov (build_search makes one group)
    momentum, nesterov = sgd['momentum'], sgd['nesterov']
    with torch.no_grad():
        for p, g in zip(weights, g_train):  # the step torch.optim.SGD would take, without changing its buffer
            d = g + sgd['weight_decay'] * p
            buf = w_opt.state.get(p, {}).get('momentum_buffer')
            buf = d if buf is None else momentum * buf + d
            p.sub_(lr * (d + momentum * buf if nesterov else buf))
    with autocast():
        logits = model(x_val)
        loss = F.cross_entropy(logits, y_val)
    # materialize_grads: the MIM decoder's weights, unused by the val loss, get zeros
    grads = torch.autograd.grad(loss, arch_params + weights, materialize_grads=True)
    d_arch, d_w = list(grads[:len(arch_params)]), list(grads[len(arch_params):])
    all_reduce_mean(d_arch + d_w, world)
    eps = 0.01 / torch.cat([g.reshape(-1) for g in d_w]).norm().clamp_min(1e-12)
    hessian = []
    draw = int(torch.randint(2 ** 62, ()))   # from the search's stream, so that a resumed run draws it alike
    for sign in (1, -1):
        with torch.no_grad():
            for p, b, g in zip(weights, backup, d_w):
                p.copy_(b + sign * eps * g)
        # float32: bf16 would round the nudge (about 1e-6 of a weight) away; one draw of S4's 'noise' at both
        # points, or their difference over 2 eps is mostly that of two draws
        with frozen(weights), fenced_random(x_tr.device, draw):
            hessian.append(torch.autograd.grad(l_train(amp=False), arch_params))
    with torch.no_grad():
        for p, b in zip(weights, backup):
            p.copy_(b)
    # dw'/da = -lr d2L_train/dw da, times 1 + momentum with Nesterov's step, which takes the gradient twice
    scale = lr * (1 + momentum if nesterov else 1)
    for p, g, hp, hm in zip(arch_params, d_arch, *hessian):
        p.grad = g - scale * (hp - hm) / (2 * eps)
    all_reduce_mean([p.grad for p in arch_params], world)
    arch_opt.step()
    return loss.detach(), (logits.argmax(1) == y_val).sum()


# ---------------------------------------------------------------------------------------------
# Decoding (§8)

# Images per batch when the supernet is read in eval mode (decode, --select perturb, --hessian-samples). Not only a
# speed: --token-bn and --decorrelate normalise by the batch's own moments, so a run decodes alike only at this size.
DECODE_BATCH = 256


def decode(model, batches, args):
    """-> (genotype or NB201 arch string, record with the averaged weights and the decode margins). S4's 'noise'
    draws in eval mode too: one fixed draw, the same on every rank and every decode, and none from the search's
    random stream."""
    device = next(model.parameters()).device
    with fenced_random(device, args.seed):
        return decode_weights(average_weights(model, batches), args)


def decode_weights(result, args):
    """The decoding rules of §8 applied to averaged weights (model.average_weights' result)."""
    space = get_space(args.space)
    if space['kind'] == 'nb201':
        arch, margins = decode_nb201(result['normal']['weights'], space['normal'],
                                     include_none=args.decode_none == 'include')
        return arch, {'weights': result, 'margins': {'normal': margins}}
    weights = {t: result[t]['weights'] for t in ('normal', 'reduce')}
    pairs = {t: result[t]['pairs'] for t in ('normal', 'reduce')} if args.topology else None
    genotype, margins = decode_darts(args.space, weights, pairs)
    return genotype, {'weights': result, 'margins': margins}


def at_least_float32(logits):
    """bf16 logits (autocast) in float32; float64 ones kept: a float64 supernet's Hessian must not be rounded to
    float32 halfway (it was, and test_hessian_vector_product_... failed by 1.3x its tolerance on an AVX-512 host)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def shares_removals(model, world):
    """Whether the ranks share out --select perturb's batches: not where RDARTS S4's 'noise' draws one stream
    through them all (any op that holds an ops.Noise)."""
    return world > 1 and not any(isinstance(m, Noise) for m in model.modules())


@torch.no_grad()
def removal_costs(model, batches, rank=0, world=1):
    """Perturbation-based selection (DARTS-PT: Wang et al., ICLR 2021), one shot, without fine-tuning: how much the
    supernet's mean loss on `batches` rises when a live candidate is taken out of its edge (its score -inf, so its
    edge's softmax renormalises over the rest) in every cell of its type, and, at a DARTS-style node of more than
    two inputs, when a whole edge is. -> {cell type: {'weights': [[cost per candidate, None for 'none'] per edge],
    'pairs': [[cost of the two edges per pair of node_pairs] per node] or None}, 'base_loss': loss with nothing
    removed, 'removals': how many were measured, 'images': on how many}: average_weights' layout, so that §8's
    rules pick the candidates, and pairs, that cost most to remove. Under torchrun the ranks share out the batches,
    whole (--token-bn and --decorrelate normalise by a batch's moments), and sum their losses: the same costs, in
    1/world of the time; RDARTS S4's 'noise' draws one stream through all the batches, so there every rank measures
    every batch."""
    batches = list(batches)
    images = sum(len(y) for _, y in batches)
    shared = shares_removals(model, world)
    if shared:
        batches = batches[rank::world]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    space = model.space

    def loss():   # S4's 'noise' draws in eval mode too: the same draws for every removal, or noise is the cost
        with fenced_random(device, 0):
            total = sum((F.cross_entropy(at_least_float32(model(x)), y, reduction='sum') for x, y in batches),
                        torch.zeros((), device=device))
        return (reduce_sum(total, world) if shared else total).item() / images

    types = cell_types(model.kind)
    model.removed = {t: (torch.zeros(len(space[t]), len(space[t][0]), dtype=torch.bool, device=device),
                         torch.zeros(len(space[t]), dtype=torch.bool, device=device)) for t in types}
    try:
        base = loss()
        out = {'base_loss': base, 'removals': 0, 'images': images}

        def cost(table):   # the loss with table's marked entry removed, less the base; then unmark it
            c = loss() - base
            table.zero_()
            out['removals'] += 1
            return c

        for t in types:
            ops, edges = model.removed[t]
            weights = []
            for e, candidates in enumerate(space[t]):
                row = []
                for j, op in enumerate(candidates):
                    if op == 'none':
                        row.append(None)
                        continue
                    ops[e, j] = True
                    row.append(cost(ops))
                weights.append(row)
            pairs = None
            if model.kind == 'darts':
                pairs, e0 = [], 0
                for _, inputs in node_inputs('darts'):
                    if len(inputs) == 2:   # one pair: nothing to choose, and no edge may go
                        pairs.append([0.0])
                    else:
                        edge_cost = []
                        for e in range(e0, e0 + len(inputs)):
                            edges[e] = True
                            edge_cost.append(cost(edges))
                        pairs.append([edge_cost[i] + edge_cost[k] for i, k in node_pairs(len(inputs))])
                    e0 += len(inputs)
            out[t] = {'weights': weights, 'pairs': pairs}
    finally:
        model.removed = None
        model.train(was_training)
    return out


HESSIAN_ITERS = 20   # at most; power iteration stops once the estimate moves by less than 1e-3 of itself


def hessian_vector_product(model, arch_params, batches, v):
    """H v for H the Hessian of the mean cross-entropy over `batches` with respect to arch_params, summed batch by
    batch (one graph alive at a time). Exact: the supernet's plain-op paths are differentiated twice."""
    images = sum(len(y) for _, y in batches)
    out = [torch.zeros_like(p) for p in arch_params]
    with twice_differentiable():
        for x, y in batches:
            loss = F.cross_entropy(at_least_float32(model(x)), y, reduction='sum') / images
            grads = torch.autograd.grad(loss, arch_params, create_graph=True, materialize_grads=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v))
            for o, h in zip(out, torch.autograd.grad(dot, arch_params, materialize_grads=True)):
                o += h
    return out


def hessian_eigenvalue(model, arch_params, weights, batches, seed=0, iters=HESSIAN_ITERS):
    """The Hessian's eigenvalue of largest magnitude (hessian_vector_product's H) by power iteration. RobustDARTS
    (Zela et al., ICLR 2020) tracks it for DARTS's alpha: it grows as a search heads for parameter-free cells. For
    MIDAS it is the curvature in W_q, W_k, a parametrisation of its own: compare its course over the epochs, not
    its size against DARTS's. Read in eval mode (BN's running statistics, as the decode and the selection read
    the supernet) with the weights held constant; random draws are fenced off, so the search goes on exactly as
    without it. -> (eigenvalue, whether it settled within iters; if not, it is the last iterate's estimate)."""
    batches = list(batches)
    device = arch_params[0].device

    def norm(vs):
        return torch.sqrt(sum((u * u).sum() for u in vs))

    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(device) for p in arch_params]
    v = [u / norm(v) for u in v]
    eig, settled = 0.0, False
    was_training = model.training
    model.eval()
    try:
        with frozen(weights):
            for _ in range(iters):
                with fenced_random(device, seed):   # S4's 'noise': one Hessian to iterate on, not a new one a step
                    hv = hessian_vector_product(model, arch_params, batches, v)
                eig, last = sum((h * u).sum() for h, u in zip(hv, v)).item(), eig   # v'Hv with |v| = 1
                size = norm(hv)
                if size == 0 or abs(eig - last) < 1e-3 * abs(eig):
                    settled = True
                    break
                v = [h / size for h in hv]
    finally:
        model.train(was_training)
    return eig, settled


def decode_costs(costs, args):
    """The genotype of --select perturb from removal_costs' result, by §8's rules read with the costs as weights:
    per edge the candidate that costs most to remove ('none' never: it has no cost), per DARTS-style node the pair
    of edges that does (the topology rule, whatever --topology). -> (genotype, margins)."""
    genotype, record = decode_weights(costs, argparse.Namespace(space=args.space, decode_none='exclude', topology=True))
    return genotype, record['margins']


def write_result(save, genotype, record, space, score, args, scores=None):
    """A finished search's outputs: weights.json (what it was decoded from), genotype.json (with the NB201
    score when there is one, the cell's scores on every dataset of the table, and the rule that chose it, which
    a resumed or re-decoded run may have changed since args.json) and the cell diagrams."""
    write_json(os.path.join(save, 'weights.json'), record)
    result = genotype_to_json(genotype, space)
    if score:
        result['nb201'] = score
    if scores:
        result['nb201_datasets'] = scores
    result['select'] = args.select
    if args.select == 'perturb':
        result['select_samples'] = args.select_samples
    elif get_space(space)['kind'] == 'nb201':   # the rule it names applies to NB201 cells alone
        result['decode_none'] = args.decode_none
    write_json(os.path.join(save, 'genotype.json'), result)
    write_diagrams(genotype, save)


def redecode(args):
    """Decode a finished run's averaged weights again, e.g. with another --decode-none, without rerunning."""
    run = args.redecode
    if args.select != 'weights':   # removal needs the supernet and the data, not weights.json
        raise RunError(f"--redecode reads the averaged weights (§8); to choose by removal, run: "
                       f"python search.py --resume {run} --select {args.select}")
    try:
        with open(os.path.join(run, 'args.json')) as f:
            settings = json.load(f)
        with open(os.path.join(run, 'weights.json')) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:   # ValueError: not JSON, or not UTF-8
        raise RunError(f"cannot re-decode '{run}': it needs the args.json and weights.json of a finished search ({e})")
    if not (isinstance(settings, dict) and isinstance(record, dict) and {'space', 'dataset'} <= settings.keys()):
        raise RunError(f"cannot re-decode '{run}': its args.json and weights.json are not those of one finished search")
    settings['decode_none'] = args.decode_none
    try:
        genotype, new = decode_weights(record['weights'], argparse.Namespace(**settings))
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise RunError(f"cannot re-decode '{run}': its args.json and weights.json are not those of one finished "
                       f"search ({type(e).__name__}: {e})") from None
    if args.decode_none == 'include' and get_space(settings['space'])['kind'] != 'nb201':
        raise RunError(f"{DECODE_NONE_NB201}, and '{run}' searched --space {settings['space']}")
    table_path = args.nb201_table or settings.get('nb201_table')   # the run's own table, while it is there
    if not args.nb201_table and not (table_path and os.path.isfile(table_path)):
        if table_path:
            print(f"{run}: its table '{table_path}' is not there: the cell goes unscored (give --nb201-table)")
        table_path = None
    table = load_nb201_table(table_path, settings['dataset']) if table_path else None
    score = nb201_score(table, genotype, settings['dataset'])
    if 'removal_costs' in record:   # a measurement of the supernet, still true; the cell it chose is replaced
        new['removal_costs'] = record['removal_costs']
        print(f"{run}: the cell chosen by removal (--select perturb) is replaced by the one its weights give")
    scores = nb201_scores(table, genotype)
    write_result(run, genotype, new, settings['space'], score, args, scores)
    scored = (f" NAS-Bench-201 valid {score['valid']:.2f} test {score['test']:.2f}"
              f"{other_datasets(scores, settings['dataset'])}" if score else '')
    print(f"{run}: {genotype}{scored}")
    return genotype


def decode_batches(loader, n_images, method):
    """Un-augmented batches of the first n_images (0 = all) of the search-train split: the same images at every
    call, so every epoch's decode reads the same ones and a resumed run decodes what an uninterrupted one does.
    A static table needs one batch: its weights do not depend on the input."""
    return first_images(loader, loader.batch_size if method == 'darts' else n_images)


def first_images(loader, n_images):
    """The batches of an unshuffled loader's first n_images (0 = all), from its start whatever was read before."""
    n = n_images or loader.n
    loader.rewind()
    seen = 0
    for x, y in loader:
        take = min(len(y), n - seen)
        yield x[:take], y[:take]
        seen += take
        if seen >= n:
            return


def min_margin(margins):
    """The smallest margin of a decode; None where no choice had a runner-up."""
    values = [m[key] for ms in margins.values() for m in ms for key in ('op_margin', 'edge_margin')
              if m.get(key) is not None]
    return min(values) if values else None


def margin_text(margin):
    return 'none: no choice had a runner-up' if margin is None else f'{margin:.3g}'   # loss units too: 1e-5 is no tie


def search_loaders(args, device, rank, world):
    """The training images split in two halves (§7): search-train trains the weights, search-val the architecture,
    each rank taking its slice of every global batch (--batch-size is the global batch). Beside them, unshuffled and
    unaugmented in batches of DECODE_BATCH: search-train for the decode, and search-val for --select perturb and
    --hessian-samples (None when neither reads it: a device copy only when used).
    -> (train_q, val_q, decode_q, select_q)"""
    meta = DATASETS[args.dataset]
    x, y = training_images(args)
    train_idx, val_idx = split_indices(len(y), args.train_portion)
    if len(train_idx) < args.batch_size or len(val_idx) < args.batch_size:
        raise RunError(f'{len(y)} images split {args.train_portion}: each half needs at least one batch of '
                       f'{args.batch_size}')
    kw = dict(mean=meta['mean'], std=meta['std'], device=device, crop_pad=meta['crop_pad'],
              channels_last=use_channels_last(device))
    train_q = GPULoader(x[train_idx], y[train_idx], args.batch_size, seed=args.seed, **kw)
    val_q = GPULoader(x[val_idx], y[val_idx], args.batch_size, seed=args.seed + 1, **kw)
    decode_q = GPULoader(x[train_idx], y[train_idx], DECODE_BATCH, shuffle=False, drop_last=False, augment=False,
                         seed=0, **kw)
    measure = args.select == 'perturb' or args.hessian_samples
    select_q = GPULoader(x[val_idx], y[val_idx], DECODE_BATCH, shuffle=False, drop_last=False, augment=False,
                         seed=0, **kw) if measure else None
    if world > 1:
        train_q.shard(rank, world)
        val_q.shard(rank, world)
    return train_q, val_q, decode_q, select_q


# ---------------------------------------------------------------------------------------------

def main(argv=None):
    args = get_args(argv)
    if args.redecode:
        if args.resume:
            raise RunError('--redecode and --resume exclude each other: --redecode RUN decodes a finished run again')
        return redecode(args)
    cfg = check_args(args)
    # absolute in args.json: a run resumed, re-decoded or analysed from another folder finds its data and table
    args.data = os.path.abspath(args.data)
    args.nb201_table = args.nb201_table and os.path.abspath(args.nb201_table)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:   # uneven slices would weigh one rank's images more in the averaged gradients
        raise RunError(f'--batch-size {args.batch_size} does not split evenly over {world} processes')
    check_amp(args, device)
    check_compile(args, device)
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    resume_state = None
    if args.resume:
        args.save = resume_folder(args)
    elif args.save is None:
        args.save = default_run_folder(f'search-{args.space}-{args.method}', world)
    checkpoint = os.path.join(args.save, 'checkpoint.pt')
    if args.resume:
        started = started_with(args.resume)
        keys = [k for k in CONFIG_KEYS if args.method == 'midas' or k not in MIDAS_ONLY]  # darts ignores them
        older = {**ADDED_KEYS, **{k: v for k, v in started.items() if k in CONFIG_KEYS}}
        if not os.path.exists(checkpoint) and not started:
            raise no_run_to_resume(args.resume, 'search.py')
        if os.path.exists(checkpoint):
            resume_state = load_checkpoint(checkpoint, config, keys, older)
        else:   # its args.json alone: stopped in its first epoch, it starts again, but as the run it was
            refuse_lost_checkpoint(args.resume)
            refuse_other_config(older, config, keys, f"'{os.path.join(args.resume, 'args.json')}'")
    elif os.path.exists(checkpoint):
        raise RunError(f"'{args.save}' already holds a run: add --resume {args.save} to continue it, "
                       "or choose another --save")
    table = load_nb201_table(args.nb201_table, args.dataset) if args.nb201_table else None
    log = Logger(args.save, rank)
    if args.resume and not args.nb201_table and started.get('nb201_table'):   # resumed_flags let it go
        log(f"--nb201-table '{started['nb201_table']}', the run's table, is not there: its cells go unscored (give "
            "--nb201-table to score them)")
    seed_everything(args.seed)

    train_q, val_q, decode_q, select_q = search_loaders(args, device, rank, world)
    model, mim_decoder, arch_params, weights, w_opt, arch_opt, forward, autocast = build_search(
        args, cfg, DATASETS[args.dataset]['num_classes'], device)
    if rank == 0:  # only now: bad flags, data or a supernet too large for memory leave no run folder behind
        os.makedirs(args.save, exist_ok=True)
    # MIM masks come from a generator of their own, seeded per rank and epoch: under torchrun each rank masks its
    # images differently, and a resumed run draws the masks an uninterrupted one drew. Mean-shift's points come
    # from one seeded per epoch alone: every rank must draw the same. The global generator, which built the same
    # supernet on every rank, is then seeded per rank, for what else draws in the loop (S4's 'noise' candidates).
    mask_gen = torch.Generator() if args.mim else None
    ms_gen = torch.Generator() if args.mean_shift else None
    if world > 1:
        torch.manual_seed(args.seed * 1000 + rank)
    mim = (mim_decoder, args.mim, args.mim_ratio, args.mim_patch, mask_gen) if args.mim else None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, args.epochs, eta_min=args.lr_min)

    start_epoch, history = 0, []
    if resume_state is not None:
        with restoring(checkpoint):
            model.load_state_dict(resume_state['model'])
            if mim_decoder is not None:
                mim_decoder.load_state_dict(resume_state['mim_decoder'])
            w_opt.load_state_dict(resume_state['w_opt'])
            arch_opt.load_state_dict(resume_state['arch_opt'])
            scheduler.load_state_dict(resume_state['scheduler'])
            train_q.load_state_dict(resume_state['train_q'])
            val_q.load_state_dict(resume_state['val_q'])
            # every rank's generator state ('rng'; an older checkpoint holds rank 0's alone)
            set_rng_states(resume_state.get('rng') or [{'cpu': resume_state['rng_cpu'],
                                                        'cuda': resume_state.get('rng_cuda')}], rank, device)
            start_epoch, history = resume_state['epoch'], resume_state['history']
        log(f'resumed {args.save} at epoch {start_epoch}')
        if rank == 0 and not started:   # its args.json lost: the flags given now, which the checkpoint accepted
            write_json(os.path.join(args.save, 'args.json'), vars(args))
        ran_with = resume_state.get('world', world)
        if ran_with != world:   # each rank's BN normalises its own slice: another slice size, another search
            log(f'it ran as {ran_with} processes and goes on as {world}: each BN now normalises batches of '
                f'{args.batch_size // world} images, not {args.batch_size // ran_with}, so it continues as neither')
    else:
        if args.resume:
            log(f'{args.save} has no checkpoint (stopped in its first epoch): searching again from the start')
        if rank == 0:
            write_json(os.path.join(args.save, 'args.json'), vars(args))
        n_arch = sum(p.numel() for p in arch_params)
        n_w = sum(p.numel() for p in weights)
        patch = f' patch={args.patch}' if args.method == 'midas' else ''   # a static table has no patches
        log(f'search {args.space} {args.method}{patch} topology={args.topology} on {args.dataset}: '
            f'{train_q.n}+{val_q.n} images, {n_w / 1e6:.3f}M weights, {n_arch} architecture '
            f'parameters, device {device}, world {world}')
        if args.method == 'darts':   # a loop over both methods may give MIDAS's flags to darts: say they do nothing
            defaults = vars(get_args([]))
            unused = [f"--{k.replace('_', '-')}" for k in MIDAS_ONLY if getattr(args, k) != defaults[k]]
            if unused:
                log(f"note: --method darts searches a static table: MIDAS's flags change nothing ({', '.join(unused)})")
        if args.arch_warmup >= args.epochs:
            log(f'warning: --arch-warmup {args.arch_warmup} >= --epochs {args.epochs}: no architecture step is taken, '
                'and the decode reads the initial architecture')

    steps = len(train_q)
    meter = Throughput((args.epochs - start_epoch) * steps)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if args.aux_skip:
            model.aux_beta.fill_(aux_skip_weight(epoch, args.epochs))
            log(f'epoch {epoch + 1}/{args.epochs}: aux-skip beta {model.aux_beta.item():.3f}')
        if mask_gen is not None:
            mask_gen.manual_seed((args.seed * 1000 + epoch) * 1000 + rank)
        if ms_gen is not None:
            ms_gen.manual_seed(args.seed * 1000 + epoch)
        lr = scheduler.get_last_lr()[0]
        totals = torch.zeros(4, device=device)  # train loss, train correct, val loss, val correct
        seen = 0
        meter.restart()
        it_log = 0
        for step, (x_tr, y_tr) in enumerate(train_q):
            x_val, y_val = val_q.next_batch()
            if epoch < args.arch_warmup:  # weights only; the val batch is still drawn, so resume stays exact
                with torch.no_grad(), autocast():   # in the precision of the architecture steps that follow
                    logits = forward(x_val)
                    v_loss, v_ok = F.cross_entropy(logits, y_val), (logits.argmax(1) == y_val).sum()
            elif args.unrolled:
                v_loss, v_ok = unrolled_arch_step(forward, arch_params, weights, arch_opt, w_opt, (x_val, y_val),
                                                  (x_tr, y_tr), lr, args, world, autocast, mim)
            else:
                v_loss, v_ok = arch_step(forward, arch_params, arch_opt, x_val, y_val, world, autocast, weights)
            if args.mean_shift:
                model.mix_offset = mean_shift_offsets(model, x_tr, y_tr, args, autocast, world, ms_gen,
                                                      ms_eps_at(args, epoch))
            t_loss, t_ok = weight_step(forward, weights, w_opt, x_tr, y_tr, args.grad_clip, world, autocast, mim,
                                       arch_params, args.detach_mixing)
            model.mix_offset = None
            totals += torch.stack([t_loss * len(y_tr), t_ok.float(), v_loss * len(y_val), v_ok.float()])
            seen += len(y_tr)
            it_log += 1
            if (step + 1) % args.report_freq == 0 or step + 1 == steps:
                # every rank's images (each rank raises alike), the only host synchronisation, once per report
                t, n = reduce_sum(totals.clone(), world).tolist(), seen * world
                if not all(map(math.isfinite, t)):
                    raise RunError(f'the loss is not finite at epoch {epoch + 1} step {step + 1} (a learning rate, '
                                   f'loss weight or temperature out of range?); the last checkpoint is of epoch '
                                   f'{epoch}')
                log(f'epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} lr {lr:.4f} '
                    f'train loss {t[0] / n:.3f} acc {100 * t[1] / n:.1f}% | '
                    f'val loss {t[2] / n:.3f} acc {100 * t[3] / n:.1f}% | '
                    f'{meter(it_log, it_log * len(y_tr) * world)}')
                it_log = 0
        scheduler.step()
        # Each rank's BN statistics saw its own batches: average them, so that every rank holds the same
        # supernet and decodes the same genotype from it.
        all_reduce_mean([b for b in model.buffers() if b.is_floating_point()], world)

        genotype, record = decode(model, decode_batches(decode_q, args.epoch_decode_samples, args.method), args)
        entry = {'epoch': epoch + 1, 'train_acc': 100 * t[1] / n, 'val_acc': 100 * t[3] / n,
                 'genotype': genotype_to_json(genotype, args.space), 'min_margin': min_margin(record['margins'])}
        score = nb201_score(table, genotype, args.dataset)
        if score:
            entry['nb201'] = score
        if args.hessian_samples and rank == 0:
            t_h = time.perf_counter()
            entry['hessian_eig'], settled = hessian_eigenvalue(model, arch_params, weights,
                                                               first_images(select_q, args.hessian_samples), args.seed)
            estimate = ''
            if not settled:   # a slow power iteration: eigenvalues of the top two close in size
                entry['hessian_settled'] = False
                estimate = f'; still moving after {HESSIAN_ITERS} iterations: an estimate'
            log(f"epoch {epoch + 1} Hessian's largest eigenvalue {entry['hessian_eig']:.4g} (architecture "
                f"parameters, {min(args.hessian_samples, select_q.n)} search-val images, "
                f"{time.perf_counter() - t_h:.0f} s{estimate})")
        history.append(entry)
        log(f'epoch {epoch + 1} genotype {genotype} (smallest decode margin {margin_text(entry["min_margin"])})')
        if score:
            log(f"epoch {epoch + 1} NAS-Bench-201 {args.dataset} valid {score['valid']:.2f} test {score['test']:.2f}")
        rng = rng_states(device, world)   # a collective: every rank takes part
        if rank == 0:
            write_json(os.path.join(args.save, 'history.json'), history)
            save_checkpoint(checkpoint, {
                'config': config, 'epoch': epoch + 1, 'history': history, 'model': model.state_dict(),
                'mim_decoder': mim_decoder.state_dict() if mim_decoder is not None else None,
                'w_opt': w_opt.state_dict(), 'arch_opt': arch_opt.state_dict(), 'scheduler': scheduler.state_dict(),
                'train_q': train_q.state_dict(), 'val_q': val_q.state_dict(), 'rng': rng, 'world': world})

    model.aux_beta.zero_()   # DARTS-'s skips end with the search (a one-epoch one ran at beta 1), as on a resume
    genotype, record = decode(model, decode_batches(decode_q, args.decode_samples, args.method), args)
    score = nb201_score(table, genotype, args.dataset)
    if args.select == 'perturb':
        log(f'by the weights (§8): {genotype}' + (f" NAS-Bench-201 {args.dataset} valid {score['valid']:.2f} test "
                                                  f"{score['test']:.2f}" if score else ''))
        select_start = time.perf_counter()
        costs = removal_costs(model, first_images(select_q, args.select_samples), rank, world)
        shared = f" (shared out over {world} processes)" if shares_removals(model, world) else ''
        log(f"perturbation selection: {costs['removals']} removals measured on {costs['images']} search-val images"
            f"{shared} in {time.perf_counter() - select_start:.0f} s")
        by_weights = {'genotype': genotype_to_json(genotype, args.space), 'margins': record['margins'], 'nb201': score}
        genotype, margins = decode_costs(costs, args)
        score = nb201_score(table, genotype, args.dataset)
        record.update(margins=margins, removal_costs=costs, by_weights=by_weights)
    scores = nb201_scores(table, genotype)
    if rank == 0:
        write_result(args.save, genotype, record, args.space, score, args, scores)
    if os.environ.get('MIDAS_RANK_STATES'):  # every rank's final supernet, for the tests to compare across ranks
        save_checkpoint(os.path.join(args.save, f'rank{rank}-state.pt'),
                        {'model': model.state_dict(), 'genotype': genotype_to_json(genotype, args.space)})
    log(f'final genotype {genotype} (smallest decode margin {margin_text(min_margin(record["margins"]))})')
    if score:
        log(f"final NAS-Bench-201 {args.dataset} valid {score['valid']:.2f} test {score['test']:.2f}"
            f"{other_datasets(scores, args.dataset)}")
    log(f"wrote {os.path.join(args.save, 'genotype.json')}")
    if world > 1:
        dist.destroy_process_group()
    return genotype


if __name__ == '__main__':
    run_cli(main)
