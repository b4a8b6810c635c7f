"""Retrain a decoded genotype with the DARTS protocol (METHOD.md §10); also home of the run
helpers search.py shares: device choice, logging, atomic checkpoints, distributed set-up, errors.

    python train.py --genotype runs/search-.../genotype.json          # search.py's result, CIFAR-10
    python train.py --genotype DARTS_V2 --dataset cifar100             # a published genotype
    python train.py --genotype "Genotype(normal=[...], ...)"           # what DARTS-family code prints
    python train.py --genotype '|nor_conv_3x3~0|+|...|'                # a NAS-Bench-201 cell
    python train.py --genotype DARTS_V2 --dataset imagenet --data IMAGENET   # mobile setting
    torchrun --nproc_per_node=8 train.py ...                           # one process per GPU
    python train.py --resume RUN                                       # continue a killed run
    python train.py --eval RUN/checkpoint.pt                           # test accuracy only

Writes into the run folder: log.txt, args.json, genotype.json, history.json, checkpoint.pt (every
epoch) and report.json (at the end).
"""
import argparse
import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import DATASETS, GPULoader, imagenet_loader, load_dataset, set_loader_epoch
from genotypes import genotype_from_json, genotype_to_json, load_genotype
from model import NB201Network, NetworkCIFAR, NetworkImageNet, count_parameters


# ---------------------------------------------------------------------------------------------
# Run helpers shared with search.py

class RunError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


def run_cli(main, argv=None):
    """Run main(argv); turn bad input into one clear stderr line and a non-zero exit, not a traceback.
    MIDAS_DEBUG=1 shows the traceback instead."""
    try:
        return main(argv)
    except (RunError, ValueError, OSError, RuntimeError) as e:
        oom = out_of_memory(e)
        if os.environ.get('MIDAS_DEBUG') or (isinstance(e, RuntimeError) and not oom):
            raise
        msg = oom or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def out_of_memory(e):
    """One line for an allocator's failure (CUDA, MPS or host memory), the commonest complaint of DARTS
    users; None for any other error, which keeps its traceback."""
    text = str(e)
    if not (isinstance(e, torch.OutOfMemoryError) or 'out of memory' in text or "can't allocate memory" in text):
        return None
    size = re.search(r'[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)', text)
    size = size.group(1) if size else 'more than is free'
    if size.endswith(' bytes'):
        n = int(size.split()[0])
        size = f'{n / 2**30:,.1f} GiB' if n >= 2**30 else f'{n:,} bytes'
    where = 'host memory' if "can't allocate memory" in text else 'device memory'
    return (f'out of {where} (tried to allocate {size}): use a smaller --batch-size or network '
            '(--init-channels, --layers, --cells)')


def pick_device(name='auto'):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type not in ('cpu', 'cuda', 'mps'):   # 'meta' and the like hold no data to train on
        raise RunError(f"device '{name}' is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise RunError(f"device '{name}' requested but MPS is not available")
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RunError(f"device '{name}' requested but CUDA is not available")
    if device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count():
        raise RunError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(device_name):
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python X.py` is one process.
    -> (rank, world_size, device). NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world == 1:
        return 0, 1, pick_device(device_name)
    rank, local = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_name)
    if device.type == 'cuda':
        device = torch.device('cuda', local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def all_reduce_mean(tensors, world):
    """Average gradients (or any tensors) over ranks in one flat buffer: one collective, not one per tensor."""
    tensors = [t for t in tensors if t is not None]
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def default_run_folder(name, world=1):
    """runs/NAME-TIME-PID, as rank 0 names it: the process id keeps apart runs started in the same second (a
    shell loop over seeds), which would otherwise share one folder."""
    folder = [os.path.join('runs', f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")]
    if world > 1:
        dist.broadcast_object_list(folder)
    return folder[0]


class Logger:
    """Prints to stdout and appends to SAVE/log.txt; silent on ranks other than 0."""

    def __init__(self, save=None, rank=0):
        self.active = rank == 0
        self.path = os.path.join(save, 'log.txt') if save and self.active else None

    def __call__(self, msg):
        if not self.active:
            return
        line = time.strftime('%H:%M:%S ') + msg
        print(line, flush=True)
        if self.path:
            with open(self.path, 'a') as f:
                f.write(line + '\n')


def atomic_write(path, write):
    """write(f) into a temp file beside path, then rename: readers never see a half-written file."""
    if os.path.isdir(path):   # os.replace would fail too, but naming the temp file
        raise IsADirectoryError(errno.EISDIR, 'a folder, where a file is to be written', path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def save_checkpoint(path, state):
    """Temp file + rename: a run killed at any moment leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f))


AFRESH = 'give the command again with another --save to start afresh'   # a run's own record stays


def load_checkpoint(path, config, keys, older=None, fix=AFRESH):
    """Load a checkpoint and refuse one written by another configuration (the `keys` of config that
    change the model or the data must match). older: {key: the value a checkpoint written before that
    key existed was run with}, so such a checkpoint still resumes. fix: what the error tells the user to do.
    A run folder without its args.json resumed with the defaults: the refusal says where the flags went."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at '{path}' to resume from")
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except OSError as e:   # a permission or a disk, not a corrupt file: deleting it would lose the run
        raise RunError(f"cannot read checkpoint '{path}': {e.strerror or e}") from None
    except Exception as e:
        raise RunError(f"checkpoint '{path}' is unreadable ({type(e).__name__}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get('config', {}), dict):
        raise RunError(f"'{path}' is not a checkpoint of this project; {fix}")
    run = os.path.dirname(path) or '.'
    lost = '' if os.path.isfile(os.path.join(run, 'args.json')) else (
        f" ('{run}' has no args.json to take the flags it ran with from: give them beside --resume)")
    refuse_other_config({**(older or {}), **state.get('config', {})}, config, keys, f"checkpoint '{path}'", lost)
    return state


def refuse_other_config(saved, config, keys, source, hint=''):
    """A run continued under other flags would record, and resume, a run it never was."""
    for k in keys:
        if saved.get(k) != config.get(k):
            raise RunError(f"{source} is from another configuration: {k}={saved.get(k)!r}, "
                           f"this run has {k}={config.get(k)!r}{hint}")


def resume_folder(args):
    """--resume RUN continues in RUN: -> RUN, cleared of the temp files a killed save left. A --save elsewhere is
    refused rather than ignored."""
    if args.save is not None and os.path.abspath(args.save) != os.path.abspath(args.resume):
        raise RunError(f"--save {args.save}: a resumed run continues in its own folder, '{args.resume}'")
    if int(os.environ.get('RANK', 0)) == 0 and any(   # rank 0 alone writes there; and only into a run's folder
            os.path.isfile(os.path.join(args.resume, f)) for f in ('args.json', 'checkpoint.pt')):
        for name in os.listdir(args.resume):   # atomic_write's temp files of a run that SIGKILL or SIGTERM (a
            if name.startswith('.tmp-'):         # preemption) stopped before its cleanup could run
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(args.resume, name))
    return args.resume


def refuse_lost_checkpoint(run):
    """--resume RUN without RUN/checkpoint.pt starts again only where the run stopped in its first epoch: one whose
    history.json records two epochs or more, or which wrote its final files, lost its checkpoint, and starting
    again would overwrite its record."""
    try:
        with open(os.path.join(run, 'history.json')) as f:
            epochs = len(json.load(f))
    except (OSError, ValueError, TypeError):
        epochs = 0
    final = [f for f in ('weights.json', 'report.json') if os.path.exists(os.path.join(run, f))]
    if epochs > 1 or final:
        done = f'its history.json records {epochs} epochs' if epochs > 1 else f'it wrote {final[0]}'
        raise RunError(f"'{run}' has no checkpoint.pt, but {done}: its checkpoint was lost; put it back to resume, "
                       f"or {AFRESH}")


def no_run_to_resume(run, script):
    """The error for --resume RUN where RUN holds no args.json: a run killed as it started leaves only its folder."""
    hint = f'; a run stopped as it started: give its command again with --save {run}' if os.path.isdir(run) else ''
    return RunError(f"'{run}' holds no {script} run to resume (no readable args.json){hint}")


def started_with(run, parser=None, script=None):
    """The flags of run's args.json ({} when it has none that can be read). With parser, every flag the file holds
    must be a value that flag can take: a hand-edited or foreign args.json gives one clear error here, not a
    TypeError deep inside the run. script ('search.py' or 'train.py', the one resuming): the other's run folder
    is refused by name (only a search's args.json holds 'method')."""
    path = os.path.join(run, 'args.json')
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            flags = json.load(f)
    except (OSError, ValueError) as e:   # ValueError: not JSON, or bytes that are not UTF-8
        raise RunError(f"'{path}' is unreadable ({type(e).__name__}); correct it or start a new run") from None
    if not isinstance(flags, dict):
        raise RunError(f"'{path}' holds no flags (a JSON object); correct it or start a new run")
    if script == 'train.py' and 'method' in flags:
        raise RunError(f"'{run}' is a search.py run: retrain its cell with --genotype "
                       f"{os.path.join(run, 'genotype.json')}")
    if script == 'search.py' and 'method' not in flags:
        raise RunError(f"'{run}' is not a search.py run (a train.py run?): search.py --resume continues a search")
    for action in parser._actions if parser else ():
        if action.dest in flags and not _fits(action, flags[action.dest]):
            raise RunError(f"{path}: {action.dest} = {flags[action.dest]!r} is not a value "
                           f"of {action.option_strings[0]}; correct it or start a new run")
    return flags


def _fits(action, value):
    """Whether value (from JSON) is one that argparse could have stored for action."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if value is None:
        return action.default is None
    if action.choices is not None:
        return value in action.choices
    if action.nargs == 0:   # store_true, --flag / --no-flag
        return isinstance(value, bool)
    if action.type is int:
        return number and isinstance(value, int)
    if action.type is float:
        return number
    return isinstance(value, str)


@contextlib.contextmanager
def restoring(path, fix=AFRESH):
    """A checkpoint that loads but does not fit the run (an entry missing, a tensor of another shape) -> one
    clear error instead of a traceback from deep inside load_state_dict."""
    try:
        yield
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [''])[0][:200]
        raise RunError(f"checkpoint '{path}' does not fit this run ({type(e).__name__}: {reason}); {fix}") from None


def format_eta(seconds):
    seconds = int(max(0, seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Throughput:
    """Images/s over the last report interval and an ETA from the mean step time since this process
    started, so that evaluation and checkpoints are part of the ETA. Call it after reading a device
    value (the report's .tolist()), which makes the clock honest on a GPU; restart() after a pause
    keeps the pause out of the next images/s."""

    def __init__(self, steps_left):
        self.steps_left, self.steps_done = steps_left, 0
        self.t_start = self.t_last = time.time()

    def restart(self):
        self.t_last = time.time()

    def __call__(self, steps, images):
        """`steps` steps of `images` images (all ranks) since the last call -> 'N img/s S s/it ETA h:mm:ss'."""
        now = time.time()
        dt, self.t_last = max(now - self.t_last, 1e-9), now
        self.steps_done += steps
        self.steps_left -= steps
        eta = (now - self.t_start) / self.steps_done * self.steps_left
        return f'{images / dt:.0f} img/s {dt / steps:.3f} s/it ETA {format_eta(eta)}'


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""
    PATHS = ('resume', 'redecode', 'eval', 'genotype', 'data', 'save', 'nb201_table', 'run', 'out')

    def error(self, message):
        print(f'{self.prog}: error: {message}', file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        for dest in self.PATHS:   # '' would read as not given: `--resume "$RUN"` with RUN unset starts a new run
            if getattr(ns, dest, None) == '':
                self.error(f"--{dest.replace('_', '-')}: an empty path (an unset shell variable?)")
        return ns, rest


# ---------------------------------------------------------------------------------------------
# Retraining (METHOD.md §10)

# Defaults of the flags left unset, by protocol. 'cifar': DARTS's train.py and paper (also SVHN and
# ImageNet16-120). 'imagenet': DARTS's train_imagenet.py in the paper's mobile setting (48 channels,
# 14 cells, 250 epochs, auxiliary head; the script's defaults changed between its versions).
# 'nb201': NAS-Bench-201's training of its cells, so that accuracies compare with the benchmark's
# table (Nesterov SGD, batch 256, 200 epochs, no clipping, no cutout).
PROTOCOLS = {   # cutout in pixels of a 32x32 image, scaled to the dataset's
    'cifar': dict(epochs=600, batch_size=96, lr=0.025, schedule='cosine', momentum=0.9, nesterov=False,
                  weight_decay=3e-4, grad_clip=5.0, label_smoothing=0.0, cutout=16, drop_path=0.2,
                  auxiliary_weight=0.4, init_channels=36, layers=20),
    'imagenet': dict(epochs=250, batch_size=128, lr=0.1, schedule='step', lr_gamma=0.97, momentum=0.9,
                     nesterov=False, weight_decay=3e-5, grad_clip=5.0, label_smoothing=0.1, cutout=0,
                     drop_path=0.0, auxiliary_weight=0.4, init_channels=48, layers=14),
    'nb201': dict(epochs=200, batch_size=256, lr=0.1, schedule='cosine', momentum=0.9, nesterov=True,
                  weight_decay=5e-4, grad_clip=0.0, label_smoothing=0.0, cutout=0, drop_path=0.0,
                  auxiliary_weight=0.0, init_channels=16, cells=5),
}
GENERAL = dict(data='./data', dataset='cifar10', lr_gamma=0.97, subset=0, seed=0)
# Flags that change how a run executes, not what it trains: a resumed run keeps its own unless given again.
RUNTIME = dict(device='auto', amp='auto', compile=False, workers=8, download=True, report_freq=50, eval_freq=1)
# Flags that change the model, the data or the schedule: a checkpoint must agree on all of them.
CONFIG_KEYS = ['genotype', 'dataset', 'subset', 'init_channels', 'layers', 'cells', 'auxiliary_weight', 'cutout',
               'drop_path', 'epochs', 'batch_size', 'lr', 'schedule', 'lr_gamma', 'momentum', 'nesterov',
               'weight_decay', 'grad_clip', 'label_smoothing', 'seed']
# Flags of training that --eval has no use for (it reads the network's from the checkpoint, and takes the data's).
EVAL_IGNORES = ['epochs', 'cutout', 'drop_path', 'lr', 'schedule', 'lr_gamma', 'momentum', 'nesterov',
                'weight_decay', 'grad_clip', 'label_smoothing', 'seed', 'eval_freq', 'compile']
EVAL_BATCH = 256  # test batches of the in-memory datasets (eval mode: the size does not change the result)


def get_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    p = Parser(description='Retrain a genotype (DARTS protocol) on CIFAR-10/100, SVHN, ImageNet16-120 or ImageNet. '
                           'Unset flags take the protocol defaults (see PROTOCOLS), or the run\'s own with --resume.')
    p.add_argument('--genotype', '--arch', help="search.py's genotype.json, a published name (DARTS_V2, ...), a "
                                                "Genotype(...) literal or a NAS-Bench-201 arch string; --arch "
                                                "as in DARTS's train.py")
    p.add_argument('--data', help='dataset root (default ./data; CIFAR is downloaded there when absent)')
    p.add_argument('--dataset', choices=['cifar10', 'cifar100', 'svhn', 'imagenet16-120', 'imagenet'],
                   help='default cifar10')
    p.add_argument('--save', help='run folder (default runs/train-DATASET-TIME-PID)')
    p.add_argument('--epochs', type=int)
    p.add_argument('--batch-size', type=int, help='the global batch, split over the torchrun processes')
    p.add_argument('--init-channels', type=int)
    p.add_argument('--layers', type=int, help='cells of a DARTS-style network')
    p.add_argument('--cells', type=int, help='cells per stage of a NAS-Bench-201 network')
    p.add_argument('--auxiliary-weight', type=float, help='weight of the auxiliary head\'s loss; 0 = no head')
    p.add_argument('--cutout', type=int, help='side of the cutout square in pixels; 0 = off')
    p.add_argument('--drop-path', type=float, help='drop-path probability, ramped linearly from 0 over the epochs')
    p.add_argument('--lr', type=float)
    p.add_argument('--schedule', choices=['cosine', 'step'], help='cosine to 0, or lr *= --lr-gamma every epoch')
    p.add_argument('--lr-gamma', type=float)
    p.add_argument('--momentum', type=float)
    p.add_argument('--nesterov', action=argparse.BooleanOptionalAction)
    p.add_argument('--weight-decay', type=float)
    p.add_argument('--grad-clip', type=float, help='gradient norm clip; 0 = off')
    p.add_argument('--label-smoothing', type=float)
    p.add_argument('--subset', type=int, help='only the first N images of the training and of the test split')
    p.add_argument('--seed', type=int)
    p.add_argument('--device', help='auto, cpu, cuda, cuda:N (default auto)')
    p.add_argument('--amp', choices=['auto', 'bf16', 'fp16', 'off'],
                   help='autocast (auto, the default: bf16 on a CUDA GPU that has it, else off); fp16 adds a '
                        'gradient scaler')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the network (default off; --no-compile turns a resumed run\'s off)')
    p.add_argument('--workers', type=int, help='ImageNet data-loading processes per GPU (default 8)')
    p.add_argument('--download', action=argparse.BooleanOptionalAction,
                   help='fetch CIFAR (or SVHN) when absent from --data (default on)')
    p.add_argument('--report-freq', type=int, help='log every N steps (default 50)')
    p.add_argument('--eval-freq', type=int, help='test every N epochs, and after the last (default 1)')
    p.add_argument('--resume', metavar='RUN', help='continue the killed run in folder RUN (its flags are the defaults)')
    p.add_argument('--eval', metavar='CHECKPOINT',
                   help='print the test accuracy of a checkpoint (or of a run folder\'s) on the whole test set, or '
                        'on its first --subset images, and exit')
    return p


def _fill(args, defaults):
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def resolve_args(args):
    """Fill the unset flags (from the run being resumed, then the protocol of this genotype and dataset)
    and check them. -> (genotype or NB201 arch string, space name or None)."""
    if args.resume:
        saved = started_with(args.resume, build_parser(), 'train.py')
        if not saved and not os.path.isfile(os.path.join(args.resume, 'checkpoint.pt')):
            raise no_run_to_resume(args.resume, 'train.py')   # args.json lost: the flags given, checked below
        _fill(args, {k: saved.get(k) for k in CONFIG_KEYS + ['data', *RUNTIME] if k != 'genotype'})
        if not args.genotype:
            args.genotype = os.path.join(args.resume, 'genotype.json')
            if not os.path.isfile(args.genotype):   # killed between its args.json and its genotype.json
                raise RunError(f"'{args.resume}' has no genotype.json: add --genotype {saved.get('genotype')}, "
                               "the cell it was started with")
        args.save = resume_folder(args)
    if not args.genotype:
        raise RunError('--genotype is required: a genotype.json, a published name such as DARTS_V2, '
                       'a Genotype(...) literal or a NAS-Bench-201 arch string')
    genotype, space = load_genotype(args.genotype)
    nb201 = isinstance(genotype, str)
    _fill(args, {'dataset': GENERAL['dataset']})
    if nb201:
        if args.dataset == 'imagenet':
            raise RunError('NAS-Bench-201 cells are trained on 32x32 or 16x16 images, not on ImageNet')
        for flag, value in (('--layers', args.layers), ('--auxiliary-weight', args.auxiliary_weight),
                            ('--drop-path', args.drop_path)):
            if value:
                raise RunError(f'{flag} does not apply to a NAS-Bench-201 network (no auxiliary head, no drop '
                               'path; --cells sets its depth)')
    elif args.cells is not None:
        raise RunError('--cells sets the depth of a NAS-Bench-201 network; a DARTS-style one uses --layers')
    protocol = dict(PROTOCOLS['imagenet' if args.dataset == 'imagenet' else 'nb201' if nb201 else 'cifar'])
    size = DATASETS[args.dataset]['size']
    protocol['cutout'] = protocol['cutout'] * size // 32   # DARTS's 16 of 32 pixels; 8 on 16x16 ImageNet16-120
    if size != 32 and args.dataset != 'imagenet':   # DARTS's CIFAR head pools the 8x8 maps of 32x32 images
        protocol['auxiliary_weight'] = 0.0
    _fill(args, protocol)
    _fill(args, GENERAL)
    _fill(args, RUNTIME)

    for name in ('epochs', 'batch_size', 'init_channels', 'layers', 'cells', 'report_freq', 'eval_freq', 'workers'):
        value = getattr(args, name)
        if value is not None and value < (0 if name == 'workers' else 1):
            raise RunError(f"--{name.replace('_', '-')} must be at least {0 if name == 'workers' else 1}")
    for name in ('cutout', 'auxiliary_weight', 'grad_clip', 'weight_decay', 'subset'):
        if not 0 <= getattr(args, name) < math.inf:   # NaN fails this too
            raise RunError(f"--{name.replace('_', '-')} must be a finite number, not negative")
    if not 0 <= args.momentum < 1:
        raise RunError('--momentum must be in [0, 1)')
    if not 0 <= args.seed < 2 ** 32:
        raise RunError('--seed must be in [0, 2**32)')
    if not 0 < args.lr < math.inf or not 0 < args.lr_gamma <= 1:
        raise RunError('--lr must be positive and finite and --lr-gamma in (0, 1]')
    if not 0 <= args.drop_path < 1 or not 0 <= args.label_smoothing < 1:
        raise RunError('--drop-path and --label-smoothing must be in [0, 1)')
    if not nb201 and args.layers < 3:
        raise RunError('--layers must be at least 3 (a DARTS network has two reduction cells)')
    if args.cutout > size:
        raise RunError(f'--cutout {args.cutout} is larger than the {size}x{size} images of {args.dataset}')
    if not nb201 and args.dataset != 'imagenet' and size != 32 and args.auxiliary_weight > 0:
        raise RunError(f'the auxiliary head needs 32x32 images, {args.dataset} has {size}x{size}: '
                       'add --auxiliary-weight 0')
    if args.dataset == 'imagenet' and (args.subset or args.cutout):
        raise RunError('--subset and --cutout apply to the in-memory datasets, not to ImageNet')
    return genotype, space


def build_model(genotype, dataset, init_channels, layers=None, cells=None, auxiliary=False):
    """DARTS-style genotypes -> NetworkCIFAR (NetworkImageNet for ImageNet); NB201 arch strings -> NB201Network."""
    classes = DATASETS[dataset]['num_classes']
    try:
        if isinstance(genotype, str):
            return NB201Network(init_channels, cells, genotype, classes)
        network = NetworkImageNet if dataset == 'imagenet' else NetworkCIFAR
        return network(init_channels, classes, layers, auxiliary, genotype)
    except AssertionError as e:  # e.g. FactorizedReduce on an odd channel count
        raise RunError(f'cannot build the network with --init-channels {init_channels}: {e}') from None


def leaves_parameters_unused(genotype):
    """Whether some parameter of the network gets no gradient, which DDP must be told of (it waits for every one):
    'noise' ignores its input, so a cell input or node read by nothing else leaves its preprocessing or its
    operations out of the graph; so does a state no edge reads and the cell does not concatenate."""
    if isinstance(genotype, str):   # NB201: every node is read, and 'none' keeps its input in the graph
        return False
    for edges, concat in ((genotype.normal, genotype.normal_concat), (genotype.reduce, genotype.reduce_concat)):
        read = {i for op, i in edges if op != 'noise'} | set(concat)
        if not set(range(len(edges) // 2 + 2)) <= read:
            return True
    return False


def training_images(args):
    """The dataset's training split, or its first --subset images: (uint8 images, labels) on the CPU."""
    x, y = load_dataset(args.dataset, args.data, train=True, download=args.download)
    if args.subset > len(y):   # the run would be recorded, and tabled, under a size it never had
        raise RunError(f'--subset {args.subset}: {args.dataset} has {len(y)} training images')
    return (x[:args.subset], y[:args.subset]) if args.subset else (x, y)


def make_queues(args, device, rank, world, train=True):
    """-> (training batches or None, this rank's test batches, how many of its test images are real or None).
    In-memory datasets live whole on the device (GPULoader): every rank draws the same global batch and
    keeps its slice, and takes a contiguous part of the test set. ImageNet goes through torchvision."""
    if args.dataset == 'imagenet':
        per_rank = args.batch_size // world
        train_q = imagenet_loader(args.data, True, per_rank, args.workers, world > 1, args.seed) if train else None
        test_q = imagenet_loader(args.data, False, per_rank, args.workers, world > 1)
        # DistributedSampler pads the test set with repeats up to a multiple of world: count only the real ones.
        return train_q, test_q, len(range(rank, len(test_q.dataset), world))
    meta = DATASETS[args.dataset]
    kw = dict(mean=meta['mean'], std=meta['std'], device=device, crop_pad=meta['crop_pad'],
              channels_last=memory_format(device, args.amp) == torch.channels_last)
    train_q = None
    if train:
        x, y = training_images(args)
        # Flips for SVHN too, as RDARTS's SVHN pipeline does.
        train_q = GPULoader(x, y, args.batch_size, cutout=args.cutout, seed=args.seed, **kw).shard(rank, world)
    x, y = load_dataset(args.dataset, args.data, train=False, download=args.download)
    if args.subset:
        x, y = x[:args.subset], y[:args.subset]
    x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    return train_q, GPULoader(x, y, EVAL_BATCH, shuffle=False, drop_last=False, augment=False, **kw), None


def memory_format(device, amp):
    """The network's and its batches' memory format: channels-last on CUDA (cuDNN), and on the CPU in float32, where
    oneDNN's depthwise, 1x1 and pooling kernels make a DARTS_V2 retraining step 1.5-1.8x faster than NCHW. Not
    bfloat16 on the CPU: torch 2.13 computes a channels-last dilated depthwise convolution's weight gradient
    wrongly there (search.dilated_bf16_grads_ok)."""
    fast = device.type == 'cuda' or (device.type == 'cpu' and amp in ('auto', 'off'))
    return torch.channels_last if fast else torch.contiguous_format


def device_batches(loader, device, fmt=torch.contiguous_format):
    """A DataLoader's batches moved to the device; GPULoader's are made there already."""
    for x, y in loader:
        if x.device != device:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=fmt)
        yield x, y


def reduce_sum(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t


def train_epoch(forward, params, batches, steps, opt, scaler, autocast, args, world, epoch, lr, meter, log):
    """One epoch. Loss and accuracy add up on the device and are read (summed over ranks) only every
    --report-freq steps: the loop itself never waits for the GPU. -> (mean loss, accuracy %)."""
    totals, seen, interval = None, 0, 0
    for step, (x, y) in enumerate(batches):
        with autocast():
            logits, logits_aux = forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            if logits_aux is not None:  # as in DARTS, the auxiliary loss is smoothed alike
                aux = F.cross_entropy(logits_aux, y, label_smoothing=args.label_smoothing)
                loss = loss + args.auxiliary_weight * aux
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(opt)  # with fp16 this reads the inf check: the one sync that loss scaling needs
        scaler.update()
        batch = torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
        totals = batch if totals is None else totals + batch
        seen, interval = seen + len(y), interval + 1
        if (step + 1) % args.report_freq == 0 or step + 1 == steps:
            t, n = reduce_sum(totals.clone(), world).tolist(), seen * world
            if not all(map(math.isfinite, t)) and not scaler.is_enabled():   # fp16's scaler skips such steps itself
                raise RunError(f'the loss is not finite at epoch {epoch + 1} step {step + 1} (a learning rate or loss '
                               f'weight out of range?); the last checkpoint is of epoch {epoch}')
            log(f'epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} lr {lr:.3e} loss {t[0] / n:.4f} '
                f'acc {100 * t[1] / n:.2f}% | {meter(interval, interval * len(y) * world)}')
            interval = 0
    return t[0] / n, 100 * t[1] / n


@torch.no_grad()
def evaluate(forward, model, batches, autocast, device, world, limit=None):
    """Test loss, top-1 and top-5 in eval mode, summed over the ranks' parts of the test set. limit: how
    many of this rank's images are real (the first ones)."""
    # RDARTS S4's 'noise' draws random numbers in eval mode too: the same draws for every evaluation of the
    # same weights (so --eval repeats the run's own figure), without touching the training's random stream
    with fenced_random(device, 0):
        return _evaluate(forward, model, batches, autocast, device, world, limit)


def _evaluate(forward, model, batches, autocast, device, world, limit):
    model.eval()
    exact = torch.float32 if device.type == 'mps' else torch.float64   # MPS has no float64
    totals, seen = torch.zeros(4, dtype=exact, device=device), 0
    for x, y in batches:
        if limit is not None:
            if seen >= limit:
                break
            x, y = x[:limit - seen], y[:limit - seen]
        with autocast():
            logits = forward(x)[0].float()
        hits = logits.topk(min(5, logits.shape[1]), 1).indices == y[:, None]
        totals[:3] += torch.stack([F.cross_entropy(logits, y, reduction='sum'), hits[:, 0].sum(), hits.any(1).sum()])
        seen += len(y)
    totals[3] = seen
    loss, top1, top5, n = reduce_sum(totals, world).tolist()
    return {'test_loss': loss / n, 'test_top1': 100 * top1 / n, 'test_top5': 100 * top5 / n, 'test_images': int(n)}


@contextlib.contextmanager
def fenced_random(device, seed):
    """What runs inside draws from `seed`, the same numbers every time, and the run's random stream goes on as if
    nothing had drawn: torch.random.fork_rng over the CPU's generator and the device's own (CUDA or MPS:
    torch.manual_seed seeds them too)."""
    own = device.type in ('cuda', 'mps')   # device_type given always: older torch refuses None
    with torch.random.fork_rng(devices=[device] if own else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def rng_states(device, world):
    """Every rank's RNG state (drop path, 'noise' ops), gathered so that rank 0's checkpoint resumes all ranks."""
    mine = {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
            'mps': torch.mps.get_rng_state() if device.type == 'mps' else None}
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def set_rng_states(states, rank, device):
    """Resume this rank's RNG state from rng_states' list; extra ranks of a wider restart keep their seed."""
    if rank < len(states):
        torch.set_rng_state(states[rank]['cpu'])
        if device.type == 'cuda' and states[rank]['cuda'] is not None:
            torch.cuda.set_rng_state(states[rank]['cuda'], device)
        if device.type == 'mps' and states[rank].get('mps') is not None:
            torch.mps.set_rng_state(states[rank]['mps'])


def amp_setup(name, device):
    """-> (resolved name, autocast context factory, gradient scaler: a pass-through unless fp16)."""
    if name == 'auto':
        name = 'bf16' if device.type == 'cuda' and torch.cuda.is_bf16_supported() else 'off'
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(name)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return name, autocast, torch.amp.GradScaler(device.type, enabled=name == 'fp16')


def evaluate_checkpoint(args):
    """--eval: the test accuracy of a checkpoint, on its own dataset and network."""
    path = os.path.join(args.eval, 'checkpoint.pt') if os.path.isdir(args.eval) else args.eval
    if not os.path.isfile(path):
        raise RunError(f"--eval {args.eval}: no checkpoint there (give a train.py run folder or its checkpoint.pt)")
    state = load_checkpoint(path, {}, [], fix='--eval takes the checkpoint.pt of a train.py run')
    config = state.get('config') or {}
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    network = ('dataset', 'init_channels', 'layers', 'cells', 'auxiliary_weight')   # what --eval rebuilds it from
    if 'genotype' not in config or 'model' not in state or not all(
            k in config and _fits(flags[k], config[k]) for k in network):
        raise RunError(f"'{path}' is not a train.py checkpoint")
    if args.dataset not in (None, config['dataset']):
        raise RunError(f"'{path}' was trained on {config['dataset']}, not {args.dataset}")
    # The run's network and dataset (and data folder, from its args.json); the whole test set unless --subset
    # says otherwise.
    _fill(args, {k: v for k, v in config.items() if k not in ('genotype', 'subset')})
    started = started_with(os.path.dirname(os.path.abspath(path)), parser)
    _fill(args, {'data': started.get('data'), 'amp': started.get('amp'),   # its precision: the same figure
                 'workers': started.get('workers')})
    _fill(args, GENERAL)
    _fill(args, RUNTIME)
    if args.subset < 0:
        raise RunError('--subset must be a finite number, not negative')
    if args.dataset == 'imagenet' and args.subset:   # make_queues would test every image all the same
        raise RunError('--subset applies to the in-memory datasets, not to ImageNet')
    genotype = genotype_from_json(config['genotype'])[0]
    rank, world, device = setup_distributed(args.device)
    _, test_q, limit = make_queues(args, device, rank, world, train=False)
    model = build_model(genotype, args.dataset, args.init_channels, args.layers, args.cells, args.auxiliary_weight > 0)
    with restoring(path, fix='leave out the network flags: --eval reads them from the checkpoint'):
        model.load_state_dict(state['model'])
    model.to(device)
    fmt = memory_format(device, args.amp)
    model = model.to(memory_format=fmt)
    _, autocast, _ = amp_setup(args.amp, device)
    result = evaluate(model, model, device_batches(test_q, device, fmt), autocast, device, world, limit)
    if rank == 0:
        print(f"test top-1 {result['test_top1']:.2f}% top-5 {result['test_top5']:.2f}% "
              f"loss {result['test_loss']:.4f} ({result['test_images']} images, {path})", flush=True)
    return result


def main(argv=None):
    args = get_args(argv)
    if args.eval:
        if args.resume:
            raise RunError('--eval and --resume exclude each other')
        if args.genotype is not None:
            raise RunError('--eval reads the cell from the checkpoint; leave out --genotype')
        ignored = [f"--{k.replace('_', '-')}" for k in EVAL_IGNORES if getattr(args, k) is not None]
        if ignored:   # silently dropped, they would read as part of the figure
            raise RunError(f"--eval tests the checkpoint as it was trained: leave out {', '.join(ignored)}")
        return evaluate_checkpoint(args)
    genotype, space = resolve_args(args)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        raise RunError(f'--batch-size {args.batch_size} does not split evenly over {world} processes')
    if args.auxiliary_weight > 0 and args.batch_size // world < 2:   # its last BN sees 1x1 maps: one value each
        raise RunError(f'--batch-size {args.batch_size} gives each process one image, and the auxiliary head needs '
                       'two to train (batch norm on 1x1 maps): raise it or add --auxiliary-weight 0')
    config = {k: getattr(args, k) for k in CONFIG_KEYS}
    config['genotype'] = genotype_to_json(genotype, space)
    state, recorded = None, {}   # recorded: the run's args.json, when it starts again from it
    if args.save is None:
        args.save = default_run_folder(f'train-{args.dataset}', world)
    checkpoint = os.path.join(args.save, 'checkpoint.pt')
    if args.resume:   # without a checkpoint it was stopped in its first epoch, and starts again with its flags
        if os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint, config, CONFIG_KEYS)
        else:   # it starts again, but as the run it was: the flags and the cell it was started with
            refuse_lost_checkpoint(args.resume)
            current = {**config, 'genotype': json.loads(json.dumps(config['genotype']))}
            recorded = started_with(args.resume)
            started = {**recorded, 'genotype': current['genotype']}
            try:
                with open(os.path.join(args.resume, 'genotype.json')) as f:
                    started['genotype'] = json.load(f)
            except (OSError, ValueError):   # killed between writing its args.json and its genotype.json
                pass
            refuse_other_config(started, current, CONFIG_KEYS, f"'{os.path.join(args.resume, 'args.json')}'")
    elif os.path.exists(checkpoint):
        raise RunError(f"'{args.save}' already holds a run: add --resume {args.save} to continue it, "
                       "or choose another --save")
    # The model is built alike everywhere and DDP copies rank 0's weights anyway; the seed differs
    # per rank so that drop-path masks do. The data order comes from the loaders' own generators.
    seed_everything(args.seed + rank)
    use_cuda = device.type == 'cuda'
    if use_cuda:
        torch.backends.cudnn.benchmark = True

    train_q, test_q, test_limit = make_queues(args, device, rank, world)
    raw = build_model(genotype, args.dataset, args.init_channels, args.layers, args.cells,
                      args.auxiliary_weight > 0).to(device)
    fmt = memory_format(device, args.amp)
    raw = raw.to(memory_format=fmt)
    n_params, n_with_aux = count_parameters(raw), count_parameters(raw, exclude_auxiliary=False)
    params = list(raw.parameters())
    opt = torch.optim.SGD(params, args.lr, momentum=args.momentum, nesterov=args.nesterov,
                          weight_decay=args.weight_decay)
    if args.schedule == 'cosine':
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)  # to 0, stepped per epoch
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=args.lr_gamma)
    amp, autocast, scaler = amp_setup(args.amp, device)

    # The run folder is written only once data and network are in place: bad input leaves nothing behind.
    if rank == 0 and state is None:
        os.makedirs(args.save, exist_ok=True)   # args.json last: a folder with it holds the whole start of a run
        write_json(os.path.join(args.save, 'genotype.json'), config['genotype'])
        # started again: the cell as the run was given it, not the genotype.json it was read back from
        write_json(os.path.join(args.save, 'args.json'),
                   {**vars(args), 'genotype': recorded.get('genotype', args.genotype)})
    elif rank == 0 and not os.path.isfile(os.path.join(args.save, 'args.json')):   # lost: the flags given now,
        write_json(os.path.join(args.save, 'args.json'), vars(args))                 # which the checkpoint accepted
    log = Logger(args.save, rank)
    start_epoch, history, wall = 0, [], 0.0
    if state is not None:
        with restoring(checkpoint):
            raw.load_state_dict(state['model'])
            opt.load_state_dict(state['optimizer'])
            scheduler.load_state_dict(state['scheduler'])
            if state['scaler']:   # empty when saved without fp16: a resume that adds --amp fp16 starts a fresh scale
                scaler.load_state_dict(state['scaler'])
            if state['train_q'] is not None:
                train_q.load_state_dict(state['train_q'])
            set_rng_states(state['rng'], rank, device)
            start_epoch, history, wall = state['epoch'], state['history'], state['wall_time']
        log(f'resumed {args.save} at epoch {start_epoch}')
    elif args.resume:
        log(f'{args.save} has no checkpoint (stopped in its first epoch): training again from the start')
    aux = f'{n_with_aux:,} with the auxiliary head' if n_with_aux != n_params else 'no auxiliary head'
    log(f'{type(raw).__name__} {genotype} on {args.dataset}: {n_params:,} parameters ({aux}); '
        f'{len(train_q)} steps of {args.batch_size} per epoch, device {device} x {world}, amp {amp}, '
        f'compile {args.compile}')

    model = raw
    if world > 1:  # DDP averages the gradients and hands rank 0's BN statistics to all before each forward
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[device.index] if use_cuda else None,
                                                          find_unused_parameters=leaves_parameters_unused(genotype))
    train_forward = torch.compile(model) if args.compile else model
    eval_forward = torch.compile(raw) if args.compile else raw

    steps = len(train_q)
    meter = Throughput((args.epochs - start_epoch) * steps)
    t_run = time.time()
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.time()
        raw.drop_path_prob = args.drop_path * epoch / args.epochs
        lr = scheduler.get_last_lr()[0]
        if not isinstance(train_q, GPULoader):
            set_loader_epoch(train_q, epoch, rank)
        raw.train()
        meter.restart()
        train_loss, train_acc = train_epoch(train_forward, params, device_batches(train_q, device, fmt), steps, opt,
                                            scaler, autocast, args, world, epoch, lr, meter, log)
        scheduler.step()
        # Each rank's BN statistics saw its own last batch: average them, so that every rank holds the
        # same model (the tests check it) and the ranks' parts of the test set meet the same network.
        all_reduce_mean([b for b in raw.buffers() if b.is_floating_point()], world)
        entry = {'epoch': epoch + 1, 'lr': lr, 'drop_path': raw.drop_path_prob, 'train_loss': train_loss,
                 'train_acc': train_acc}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            entry.update(evaluate(eval_forward, raw, device_batches(test_q, device, fmt), autocast, device, world,
                                  test_limit))
            best = max(h.get('test_top1', -1) for h in history + [entry])
            log(f"epoch {epoch + 1}/{args.epochs} test loss {entry['test_loss']:.4f} top-1 "
                f"{entry['test_top1']:.2f}% top-5 {entry['test_top5']:.2f}% (best {best:.2f}%) | "
                f"train loss {train_loss:.4f} acc {train_acc:.2f}% | {time.time() - t_epoch:.0f} s")
        entry['time_s'] = time.time() - t_epoch
        history.append(entry)
        rng = rng_states(device, world)
        if rank == 0:
            write_json(os.path.join(args.save, 'history.json'), history)
            save_checkpoint(checkpoint, {
                'config': config, 'epoch': epoch + 1, 'history': history, 'model': raw.state_dict(),
                'optimizer': opt.state_dict(), 'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
                'train_q': train_q.state_dict() if isinstance(train_q, GPULoader) else None, 'rng': rng,
                'wall_time': wall + time.time() - t_run})

    final = history[-1]  # the last epoch is always tested
    best = max((h for h in history if 'test_top1' in h), key=lambda h: h['test_top1'])
    report = {'genotype': config['genotype'], 'network': type(raw).__name__, 'dataset': args.dataset,
              'test_top1': final['test_top1'], 'test_top5': final['test_top5'], 'test_loss': final['test_loss'],
              'best_top1': best['test_top1'], 'best_epoch': best['epoch'], 'params': n_params,
              'params_with_aux': n_with_aux, 'epochs': args.epochs,
              'wall_time_s': round(wall + time.time() - t_run, 1), 'world_size': world, 'amp': amp}
    if rank == 0:
        write_json(os.path.join(args.save, 'report.json'), report)
    if os.environ.get('MIDAS_RANK_STATES'):  # every rank's final weights, for the tests to compare across ranks
        save_checkpoint(os.path.join(args.save, f'rank{rank}-state.pt'), raw.state_dict())
    log(f"final test top-1 {final['test_top1']:.2f}% top-5 {final['test_top5']:.2f}% (best {best['test_top1']:.2f}% "
        f"at epoch {best['epoch']}); wrote {os.path.join(args.save, 'report.json')}")
    if world > 1:
        dist.destroy_process_group()
    return report


if __name__ == '__main__':
    run_cli(main)
