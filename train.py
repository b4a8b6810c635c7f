"""Retrain a decoded genotype with the DARTS protocol (METHOD.md §10); also home of the run
helpers search.py shares: device choice, logging, atomic checkpoints, distributed set-up, errors.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------------------------
# Run helpers shared with search.py

class RunError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


def run_cli(main, argv=None):
    """Run main(argv); turn bad input into one clear stderr line and a non-zero exit, not a traceback.
    MIDAS_DEBUG=1 shows the traceback instead."""
    try:
        return main(argv)
    except (RunError, ValueError, OSError) as e:
        if os.environ.get('MIDAS_DEBUG'):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def pick_device(name='auto'):
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise RunError(f"device '{name}' requested but CUDA is not available")
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


def _atomic_write(path, write):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + '\n').encode()))


def save_checkpoint(path, state):
    """Temp file + rename: a run killed at any moment leaves the previous checkpoint intact."""
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, config, keys):
    """Load a checkpoint and refuse one written by another configuration (the `keys` of config that
    change the model or the data must match)."""
    if not os.path.isfile(path):
        raise RunError(f"no checkpoint at '{path}' to resume from")
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise RunError(f"checkpoint '{path}' is unreadable ({type(e).__name__}); delete it to start afresh") from None
    saved = state.get('config', {})
    for k in keys:
        if saved.get(k) != config.get(k):
            raise RunError(f"checkpoint '{path}' is from another configuration: {k}={saved.get(k)!r}, "
                           f"this run has {k}={config.get(k)!r}")
    return state


def format_eta(seconds):
    seconds = int(max(0, seconds))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message):
        print(f'{self.prog}: error: {message}', file=sys.stderr)
        sys.exit(2)
