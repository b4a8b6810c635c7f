"""Benchmarks, measured side by side in one run:

  * a search iteration (architecture step + weight step: search.arch_step and search.weight_step, or
    search.unrolled_arch_step with --unrolled) for --method midas and --method darts, interleaved in one
    process (midas, darts, darts, midas, ...) after warm-up iterations: median seconds, images/s, ratio
    (images/s counts the weight step's batch, as an epoch over search-train does; the architecture step reads as
    many search-val images besides);
  * a search epoch and a whole search derived from them: an epoch is --epoch-images // batch iterations plus
    the decode that ends it (measured: search.py's decode over its first 2,048 search-train images);
  * the peak memory of each method, each measured in its own child process (peak RSS is per process;
    on CUDA torch.cuda.max_memory_allocated);
  * a retraining step (NetworkCIFAR with DARTS_V2, auxiliary head, drop path: forward + backward + SGD);
  * the data path alone (GPULoader: crop, flip, cutout 16, normalisation), images/s.

    python bench.py --preset cpu                      # 8 channels, 5 cells, batch 32, 2 threads, darts space
    python bench.py --preset gpu-defaults --device cuda
    python bench.py --preset cpu --token mean         # how much of MIDAS's cost is the 'meanstd' token

Random data of the right shape stands in for a dataset. Prints a table, then ONE JSON line with every
figure. No side effects at import.
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ('midas', 'darts')
PRESETS = {
    # the CPU targets (the original DARTS code: 3.0 s per iteration, 1.8 GB peak RSS here)
    'cpu': dict(space='darts', init_channels=8, layers=5, cells=5, batch_size=32, threads=2,
                train_channels=8, train_layers=5, train_batch_size=32),
    # the DARTS search defaults; the retraining step at the DARTS CIFAR protocol's size
    'gpu-defaults': dict(space='darts', init_channels=16, layers=8, cells=5, batch_size=64,
                         train_channels=36, train_layers=20, train_batch_size=96),
}
DEFAULTS = dict(space='darts', init_channels=16, layers=8, cells=5, batch_size=64, threads=0,
                train_channels=None, train_layers=None, train_batch_size=None)


def get_args(argv=None):
    from train import Parser
    p = Parser(description='Benchmark the MIDAS / DARTS search iteration, the retraining step and the data path')
    p.add_argument('--preset', choices=sorted(PRESETS), help='a named configuration; explicit flags override it')
    p.add_argument('--space', help='darts, s1, s2, s3, s4 or nb201 (default darts)')
    p.add_argument('--init-channels', type=int, help='supernet channels (default 16)')
    p.add_argument('--layers', type=int, help='cells of a DARTS-style supernet (default 8)')
    p.add_argument('--cells', type=int, help='cells per stage of the NB201 supernet (default 5)')
    p.add_argument('--batch-size', type=int, help='search batch (default 64)')
    p.add_argument('--patch', type=int, default=4, help='MIDAS patch side; 0 = global pooling (default %(default)s)')
    p.add_argument('--token', default='meanstd', choices=['mean', 'meanstd'],
                   help="MIDAS's patch token (default %(default)s)")
    p.add_argument('--unrolled', action='store_true', help='second-order architecture step')
    p.add_argument('--detach-mixing', action=argparse.BooleanOptionalAction, default=None,
                   help="search.py's --detach-mixing (default: search.py's)")
    p.add_argument('--edge-norm', action=argparse.BooleanOptionalAction, default=None,
                   help="search.py's --edge-norm (default: search.py's)")
    p.add_argument('--token-bn', action=argparse.BooleanOptionalAction, default=None,
                   help="search.py's --token-bn (default: search.py's)")
    p.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s own)')
    p.add_argument('--iters', type=int, default=10, help='timed iterations per method (default %(default)s)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations per method first (default %(default)s)')
    p.add_argument('--mem-iters', type=int, default=2,
                   help='iterations of each memory child after its warm-up (default %(default)s)')
    p.add_argument('--epoch-images', type=int, default=25000,
                   help="images a search epoch trains on, for the derived epoch time (default %(default)s: "
                        "CIFAR's search-train half)")
    p.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:N')
    p.add_argument('--amp', default='auto', choices=['auto', 'bf16', 'off'],
                   help='autocast (auto: bf16 on a CUDA GPU that has it, else off)')
    p.add_argument('--compile', action='store_true', help='torch.compile the networks')
    p.add_argument('--contiguous', action='store_true', help='NCHW maps instead of channels-last (to measure it)')
    p.add_argument('--train-channels', type=int,
                   help="retraining network channels (default: the preset's, else --init-channels)")
    p.add_argument('--train-layers', type=int, help="retraining network cells (default: the preset's, else --layers)")
    p.add_argument('--train-batch-size', type=int,
                   help="retraining batch (default: the preset's, else --batch-size)")
    p.add_argument('--data-images', type=int, default=50000,
                   help='random uint8 CIFAR-size images for the data path (default %(default)s)')
    p.add_argument('--data-batch-size', type=int, help='data path batch (default --train-batch-size)')
    p.add_argument('--data-epochs', type=int, default=2,
                   help='timed passes over the data path images (default %(default)s)')
    p.add_argument('--skip', default='', help='comma-separated parts to leave out: search, memory, train, data')
    p.add_argument('--seed', type=int, default=0, help='random data and weights (default %(default)s)')
    p.add_argument('--_child', choices=METHODS, help=argparse.SUPPRESS)  # internal: one method's memory
    args = p.parse_args(argv)
    for k, v in {**DEFAULTS, **(PRESETS[args.preset] if args.preset else {})}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name, default in (('train_channels', 'init_channels'), ('train_layers', 'layers'),
                          ('train_batch_size', 'batch_size'), ('data_batch_size', 'train_batch_size')):
        if getattr(args, name) is None:   # an explicit 0 stays, for the check below
            setattr(args, name, getattr(args, default))
    args.skip = {s for s in args.skip.split(',') if s}
    from train import RunError
    if args.skip - {'search', 'memory', 'train', 'data'}:
        raise RunError(f"--skip takes search, memory, train, data; not {', '.join(sorted(args.skip))}")
    if args.skip == {'search', 'memory', 'train', 'data'}:
        raise RunError('--skip leaves nothing to measure')
    for name in ('iters', 'batch_size', 'init_channels', 'layers', 'cells', 'train_channels', 'train_layers',
                 'train_batch_size', 'data_images', 'data_batch_size', 'data_epochs', 'mem_iters', 'epoch_images'):
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')} must be at least 1")
    # a DARTS network needs its two reduction cells, a search supernet normal cells besides
    if args.space != 'nb201' and args.layers < 3:
        raise RunError('a DARTS-style --layers must be at least 3')
    if args.train_layers < 2:   # it follows --layers when not given
        raise RunError(f'--train-layers must be at least 2 (it is {args.train_layers}, from --layers when not given)')
    if args.warmup < 0 or args.threads < 0:
        raise RunError('--warmup and --threads must not be negative')
    if args.data_images < args.data_batch_size:
        raise RunError('--data-images must be at least --data-batch-size (which follows --train-batch-size and '
                       '--batch-size when not given)')
    if 'train' not in args.skip and args.train_batch_size < 2:   # the auxiliary head's last BN sees 1x1 maps
        raise RunError('--train-batch-size must be at least 2: the retraining step has an auxiliary head')
    if args.epoch_images < args.batch_size:
        raise RunError('--epoch-images must be at least --batch-size')
    return args


# ---------------------------------------------------------------------------------------------
# Clocks and memory

class Clock:
    """Wall-clock seconds of a piece of work; on CUDA and MPS the device is synchronised before and after."""

    def __init__(self, device):
        self.sync = {'cuda': torch.cuda.synchronize, 'mps': lambda: torch.mps.synchronize()}.get(device.type,
                                                                                                  lambda: None)

    def __call__(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def rss_mb():
    """This process's resident set now (Linux /proc), in MB; None elsewhere (JSON has no NaN)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb():
    """Peak resident set of this process so far, in MB: VmHWM of /proc/self/status, which starts afresh at
    exec (Linux's ru_maxrss does not: a child forked from a big parent inherits the parent's peak)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 2 ** 10
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / 2 ** 20 if sys.platform == 'darwin' else peak / 2 ** 10


# ---------------------------------------------------------------------------------------------
# The search iteration, built as search.py builds it

def search_args(args, method, device):
    """search.py's own flags (and so its defaults) for this configuration."""
    import search
    argv = ['--space', args.space, '--method', method, '--patch', str(args.patch), '--token', args.token,
            '--init-channels', str(args.init_channels), '--layers', str(args.layers), '--cells', str(args.cells),
            '--batch-size', str(args.batch_size), '--device', str(device), '--amp', args.amp]
    if args.unrolled:
        argv.append('--unrolled')
    for flag in ('detach_mixing', 'edge_norm', 'token_bn'):   # search.py's default unless given
        if getattr(args, flag) is not None:
            argv.append(('--' if getattr(args, flag) else '--no-') + flag.replace('_', '-'))
    if args.compile:
        argv.append('--compile')
    sargs = search.get_args(argv)
    cfg = search.check_args(sargs)
    if channels_last(device, args):   # what search.py refuses is not timed either (bf16 on a broken CPU kernel)
        search.check_amp(sargs, device)
    search.check_compile(sargs, device)
    return sargs, cfg


def channels_last(device, args):
    """search.py's choice of memory format, unless --contiguous asks for NCHW."""
    import search
    return search.use_channels_last(device) and not args.contiguous


class SearchBench:
    """One method's supernet, optimisers and random batches; step() is one search iteration."""

    def __init__(self, args, method, device, seed):
        import search
        from data import DATASETS
        self.search, self.args = search, args
        sargs, cfg = search_args(args, method, device)
        self.sargs = sargs
        torch.manual_seed(seed)
        meta = DATASETS[sargs.dataset]
        fmt = torch.channels_last if channels_last(device, args) else torch.contiguous_format
        (self.model, _, self.arch_params, self.weights, self.w_opt, self.arch_opt, self.forward,
         self.autocast) = search.build_search(sargs, cfg, meta['num_classes'], device, fmt == torch.channels_last)
        self.model.train()
        size, b, k = meta['size'], sargs.batch_size, meta['num_classes']
        g = torch.Generator().manual_seed(seed)
        self.batches = [(torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=fmt),
                         torch.randint(0, k, (b,), generator=g).to(device)) for _ in range(4)]
        self.k = 0
        self.lr = sargs.lr

    def step(self):
        s, a = self.search, self.sargs
        (x_val, y_val), (x_tr, y_tr) = self.batches[self.k % 4], self.batches[(self.k + 1) % 4]
        self.k += 2
        if a.unrolled:
            s.unrolled_arch_step(self.forward, self.arch_params, self.weights, self.arch_opt, self.w_opt,
                                 (x_val, y_val), (x_tr, y_tr), self.lr, a, 1, self.autocast)
        else:
            s.arch_step(self.forward, self.arch_params, self.arch_opt, x_val, y_val, 1, self.autocast, self.weights)
        s.weight_step(self.forward, self.weights, self.w_opt, x_tr, y_tr, a.grad_clip, 1, self.autocast,
                      arch_params=self.arch_params, detach_mixing=a.detach_mixing)

    def decode(self, loader, n_images):
        """search.py's decode: its first n_images, read from loader as search.py reads its decode split."""
        self.search.decode(self.model, self.search.decode_batches(loader, n_images, self.sargs.method), self.sargs)


def bench_search(args, device, decode_images):
    """Both methods in this process, interleaved: -> ({method: [seconds per timed iteration]},
    {method: seconds of a decode of decode_images})."""
    clock = Clock(device)
    benches = {m: SearchBench(args, m, device, args.seed) for m in METHODS}
    times = {m: [] for m in METHODS}
    for r in range(args.warmup + args.iters):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):  # alternate which goes first
            dt = clock(benches[m].step)
            if r >= args.warmup:
                times[m].append(dt)
    # search.py's decode split: unshuffled, unaugmented batches of DECODE_BATCH (random uint8 images here)
    import search
    from data import DATASETS, GPULoader
    meta = DATASETS[benches['midas'].sargs.dataset]
    g = torch.Generator().manual_seed(args.seed)
    loader = GPULoader(torch.randint(0, 256, (decode_images, 3, meta['size'], meta['size']), dtype=torch.uint8,
                                     generator=g), torch.zeros(decode_images, dtype=torch.long), search.DECODE_BATCH,
                       meta['mean'], meta['std'], device=device, shuffle=False, drop_last=False, augment=False,
                       channels_last=channels_last(device, args))
    decode = {}
    for m, bench in benches.items():
        bench.decode(loader, decode_images)   # warm-up: eval mode, batches of another size
        decode[m] = statistics.median(clock(lambda: bench.decode(loader, decode_images)) for _ in range(3))
    return times, decode


def child_memory(args, device):
    """--_child METHOD: one method alone in this process -> its peak memory, printed as JSON."""
    clock = Clock(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    bench = SearchBench(args, args._child, device, args.seed)
    base = rss_mb()
    times = [clock(bench.step) for _ in range(args.warmup + args.mem_iters)]
    out = {'method': args._child, 'peak_rss_mb': peak_rss_mb(), 'rss_after_build_mb': base,
           'median_s': statistics.median(times[args.warmup:])}
    if device.type == 'cuda':
        out['cuda_peak_mb'] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print(json.dumps(out), flush=True)


def bench_memory(args, argv):
    """Each method's peak memory, measured in a fresh child process of its own."""
    out = {}
    for m in METHODS:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, '--_child', m]
        r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        if r.returncode != 0:
            from train import RunError
            last = (r.stderr.strip().splitlines() or ['no output'])[-1][:300]
            raise RunError(f'the memory measurement of {m} (a child process) failed with exit code {r.returncode}: '
                           f'{last}')
        out[m] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------
# The retraining step and the data path

def bench_train(args, device):
    """NetworkCIFAR(DARTS_V2), auxiliary head (weight 0.4) and drop path 0.2, SGD, gradient clip 5, as
    train.py's DARTS protocol: -> seconds per timed step."""
    from genotypes import DARTS_V2
    from model import NetworkCIFAR
    from train import memory_format
    torch.manual_seed(args.seed)
    cuda = device.type == 'cuda'
    fmt = torch.contiguous_format if args.contiguous else memory_format(device, args.amp)   # as train.py
    net = NetworkCIFAR(args.train_channels, 10, args.train_layers, True, DARTS_V2, drop_path_prob=0.2).to(device)
    net = net.to(memory_format=fmt)
    if cuda:
        torch.backends.cudnn.benchmark = True
    net.train()
    params = list(net.parameters())
    opt = torch.optim.SGD(params, 0.025, momentum=0.9, weight_decay=3e-4)
    forward = torch.compile(net) if args.compile else net
    from train import amp_setup
    _, autocast, _ = amp_setup(args.amp, device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.train_batch_size, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.train_batch_size,), generator=g).to(device)

    def step():
        with autocast():
            logits, logits_aux = forward(x)
            loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(logits_aux, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()

    clock = Clock(device)
    times = [clock(step) for _ in range(args.warmup + args.iters)]
    return times[args.warmup:]


def bench_data(args, device):
    """GPULoader over random uint8 CIFAR-size images: crop (pad 4), flip, cutout 16, normalise ->
    (images, seconds) over --data-epochs passes, the first less the warm-up batch."""
    from data import DATASETS, GPULoader
    meta = DATASETS['cifar10']
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (args.data_images, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.data_images,), generator=g)
    loader = GPULoader(x, y, args.data_batch_size, meta['mean'], meta['std'], device=device,
                       crop_pad=meta['crop_pad'], cutout=16, seed=args.seed, channels_last=channels_last(device, args))
    del x
    clock = Clock(device)
    clock(loader.next_batch)  # warm-up (also draws the first permutation)
    seen = []

    def passes():
        for _ in range(args.data_epochs):
            for xb, _ in loader:
                seen.append(len(xb))

    dt = clock(passes)
    return sum(seen), dt


# ---------------------------------------------------------------------------------------------

def git_commit():
    try:
        r = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    from train import amp_setup, pick_device
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        return child_memory(args, device)

    midas_args = search_args(args, 'midas', device)[0]
    res = {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({os.cpu_count()} cores)',
           'device_type': device.type, 'threads': torch.get_num_threads(), 'torch': torch.__version__,
           'date': datetime.date.today().isoformat(), 'commit': git_commit(), 'preset': args.preset,
           'space': args.space, 'init_channels': args.init_channels, 'layers': args.layers, 'cells': args.cells,
           'batch_size': args.batch_size, 'patch': args.patch, 'token': args.token, 'unrolled': args.unrolled,
           'amp': amp_setup(args.amp, device)[0], 'compile': args.compile, 'channels_last': channels_last(device, args),
           'iters': args.iters, 'warmup': args.warmup,
           'detach_mixing': midas_args.detach_mixing, 'edge_norm': midas_args.edge_norm,
           'token_bn': midas_args.token_bn}
    depth = f"{args.layers} cells" if args.space != 'nb201' else f"{args.cells} cells/stage"
    print(f"bench.py on {res['device']}, {res['threads']} threads, torch {res['torch']}, {res['date']}, "
          f"commit {res['commit']}: space {args.space}, {args.init_channels} channels, {depth}, "
          f"batch {args.batch_size}, patch {args.patch}, token {args.token}, "
          f"edge-norm {res['edge_norm']}, token-bn {res['token_bn']}, {'second' if args.unrolled else 'first'} order, "
          f"detach-mixing {res['detach_mixing']}, amp {res['amp']}, "
          f"compile {args.compile}, "
          f"channels_last {res['channels_last']}; medians of {args.iters} after {args.warmup} warm-up",
          flush=True)   # first: at the default sizes on a CPU the figures take minutes
    rows = []
    if 'search' not in args.skip:
        # search.py's epoch: epoch_images // batch iterations, then a decode of its first --epoch-decode-samples
        # images; its run: --epochs of them, then the final decode of every image (a static table reads one batch)
        steps, epochs = args.epoch_images // args.batch_size, midas_args.epochs
        n_decode = min(midas_args.epoch_decode_samples or args.epoch_images, args.epoch_images)
        times, decode = bench_search(args, device, n_decode)
        for m in METHODS:
            med = statistics.median(times[m])
            res[f'search_iter_s_{m}'] = med
            res[f'search_iter_s_min_{m}'] = min(times[m])
            res[f'images_per_s_{m}'] = args.batch_size / med
            rows.append((f'search iteration, {m}', f'{med:.4f} s', f'{args.batch_size / med:,.0f} img/s',
                         f'min {min(times[m]):.4f} s, max {max(times[m]):.4f} s'))
        res['search_ratio_midas_darts'] = res['search_iter_s_midas'] / res['search_iter_s_darts']
        rows.append(('midas / darts', f"{res['search_ratio_midas_darts']:.3f}", '', ''))
        res.update(epoch_images=args.epoch_images, search_epochs=epochs)
        for m in METHODS:
            epoch = steps * res[f'search_iter_s_{m}'] + decode[m]
            final = decode[m] * (args.epoch_images / n_decode if m == 'midas' else 1)
            res.update({f'decode_s_{m}': decode[m], f'search_epoch_s_{m}': epoch,
                        f'search_run_h_{m}': (epochs * epoch + final) / 3600})
            rows.append((f'search epoch, {m}', f'{epoch:,.1f} s', f"{epochs} epochs: {res[f'search_run_h_{m}']:.2f} h",
                         f'{steps} iterations + decode {decode[m]:.2f} s'))
    if 'memory' not in args.skip:
        child_argv = [a for a in argv]
        mem = bench_memory(args, child_argv)
        kind = 'cuda_peak_mb' if device.type == 'cuda' else 'peak_rss_mb'
        res['peak_mem_kind'] = 'cuda max_memory_allocated' if device.type == 'cuda' else 'peak RSS of a child process'
        for m in METHODS:
            res[f'peak_mem_mb_{m}'] = mem[m][kind]
            res[f'peak_rss_mb_{m}'] = mem[m]['peak_rss_mb']
            res[f'rss_after_build_mb_{m}'] = mem[m]['rss_after_build_mb']
            built = mem[m]['rss_after_build_mb']
            rows.append((f'peak memory, {m}', f'{mem[m][kind]:,.0f} MB', res['peak_mem_kind'],
                         f'RSS after building {built:,.0f} MB' if built is not None else ''))
        res['peak_mem_ratio'] = res['peak_mem_mb_midas'] / res['peak_mem_mb_darts']
        rows.append(('peak memory midas / darts', f"{res['peak_mem_ratio']:.3f}", '', ''))
    if 'train' not in args.skip:
        times = bench_train(args, device)
        med = statistics.median(times)
        res.update(train_step_s=med, train_images_per_s=args.train_batch_size / med,
                   train_channels=args.train_channels, train_layers=args.train_layers,
                   train_batch_size=args.train_batch_size)
        rows.append((f'retrain step, DARTS_V2 {args.train_channels} ch {args.train_layers} cells '
                     f'batch {args.train_batch_size}', f'{med:.4f} s',
                     f'{args.train_batch_size / med:,.0f} img/s', f'min {min(times):.4f} s'))
    if 'data' not in args.skip:
        n, dt = bench_data(args, device)
        res.update(data_images_per_s=n / dt, data_s=dt, data_images_timed=n, data_batch_size=args.data_batch_size,
                   data_images=args.data_images)
        rows.append((f'data path, batch {args.data_batch_size} (crop, flip, cutout 16)', f'{dt:.2f} s',
                     f'{n / dt:,.0f} img/s', f'{n} images'))

    width = max((len(r[0]) for r in rows), default=10)
    for r in rows:
        print(f'  {r[0]:<{width}}  {r[1]:>12}  {r[2]:>16}  {r[3]}')
    print(json.dumps(res), flush=True)
    return res


if __name__ == '__main__':
    from train import run_cli
    run_cli(main)
