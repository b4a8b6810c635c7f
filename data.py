"""Datasets and an airbench-style loader for the search and the retraining.

CIFAR-10/100 and ImageNet16-120 are read from their official pickles into one uint8 tensor
(N x 3 x H x W), which GPULoader keeps whole on the training device: every batch is a slice of a
per-epoch permutation, augmented with batched tensor ops (crop, flip, cutout) and normalised there,
so no Python runs per image. SVHN and ImageNet go through torchvision, imported only when used.
Imports nothing of the project; importing it has no side effects.
"""
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Missing, corrupt or unsupported data, said in one sentence."""


# Normalisation constants as used by DARTS / RDARTS (CIFAR, SVHN), NAS-Bench-201 (ImageNet16) and
# torchvision (ImageNet). crop_pad is the usual zero padding of the random crop for that dataset.
DATASETS = {
    'cifar10': dict(num_classes=10, size=32, crop_pad=4,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    'cifar100': dict(num_classes=100, size=32, crop_pad=4,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    'svhn': dict(num_classes=10, size=32, crop_pad=4,
                 mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970)),
    'imagenet16-120': dict(num_classes=120, size=16, crop_pad=2,
                           mean=(122.68 / 255, 116.66 / 255, 104.01 / 255),
                           std=(63.22 / 255, 61.26 / 255, 65.09 / 255)),
    'imagenet': dict(num_classes=1000, size=224, crop_pad=0,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

# name -> folder inside root, official archive, its md5, train files, test files, label key
_CIFAR = {
    'cifar10': ('cifar-10-batches-py', 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
                'c58f30108f718f92721af3b95e74349a',
                [f'data_batch_{i}' for i in range(1, 6)], ['test_batch'], 'labels'),
    'cifar100': ('cifar-100-python', 'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
                 'eb9058c3a382ffc7106e4002c42a8d85', ['train'], ['test'], 'fine_labels'),
}
_IN16_DIR = 'ImageNet16'
_IN16_TRAIN = [f'train_data_batch_{i}' for i in range(1, 11)]
_IN16_VAL = ['val_data']


# ----------------------------------------------------------------------------------------------
# Reading the official files

def _unpickle(path):
    """One official batch file as a dict with str keys (Python 2 pickles carry bytes keys)."""
    try:
        with open(path, 'rb') as f:
            # The official format is a pickle, so this trusts the file as much as any loader of it does.
            d = pickle.load(f, encoding='latin1')
    except Exception as e:
        raise DataError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); "
                        f"delete it and fetch the dataset again") from e
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, not the dict of an official batch file")
    return {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path, label_key, size):
    """One batch file -> (uint8 N x 3 x size x size, int64 labels); its 'data' rows are CHW order."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing; the dataset folder is incomplete, delete it and fetch the dataset again")
    d = _unpickle(path)
    if 'data' not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry of an official batch file")
    try:
        raw, y = np.asarray(d['data']), np.asarray(d[label_key]).reshape(-1)
        # uint8 pixels and integer labels, as the official files (an empty list of labels reads as float64)
        if raw.dtype != np.uint8 or (y.dtype.kind not in 'iu' and y.size):
            raise TypeError(f"pixels of type {raw.dtype}, labels of type {y.dtype}")
        x, y = raw, y.astype(np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path} holds 'data' or '{label_key}' that are not the official uint8 pixels and integer "
                        f"labels ({str(e)[:120]}); delete it and fetch the dataset again") from None
    if x.size != len(y) * 3 * size * size:
        raise DataError(f"{path} has {x.size} bytes of images for {len(y)} labels of {3 * size * size} bytes each")
    return x.reshape(-1, 3, size, size), y


def _to_torch(xs, ys):
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _download_cifar(name, root):
    """Fetch the official archive to a temporary file, check its md5, unpack it safely into root."""
    folder, url, md5 = _CIFAR[name][:3]
    os.makedirs(root, exist_ok=True)
    fd, archive = tempfile.mkstemp(suffix='.tar.gz.part', dir=root)
    unpack = tempfile.mkdtemp(prefix='.unpack-', dir=root)
    try:
        print(f"downloading {url} to {root}")
        digest = hashlib.md5()
        try:
            with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as e:
            raise DataError(f"could not download {url} ({e}); put the unpacked {folder}/ under {root}, "
                            f"or run where that URL is reachable") from e
        if digest.hexdigest() != md5:
            raise DataError(f"{url} downloaded with md5 {digest.hexdigest()}, not {md5}; try again, "
                            f"or put the unpacked {folder}/ under {root}")
        with tarfile.open(archive, 'r:gz') as tar:
            members = tar.getmembers()
            for m in members:  # only plain files and folders below `folder`: no links, no escaping paths
                parts = m.name.replace('\\', '/').split('/')
                if not (m.isfile() or m.isdir()) or parts[0] != folder or '..' in parts or m.name.startswith('/'):
                    raise DataError(f"{url} holds an unexpected entry {m.name!r}; refusing to unpack it")
            kw = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
            tar.extractall(unpack, members=members, **kw)
        # Move into place only once complete, so an interrupted run never leaves a half folder behind. The
        # processes of a torchrun all download when the folder is absent: the first to finish puts its copy in
        # place, and the others, finding it there, keep it.
        try:
            os.replace(os.path.join(unpack, folder), os.path.join(root, folder))
        except OSError:
            if not os.path.isdir(os.path.join(root, folder)):
                raise
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
        if os.path.exists(archive):
            os.remove(archive)


def _load_cifar(name, root, train, download):
    folder, url, _, train_files, test_files, label_key = _CIFAR[name]
    path = os.path.join(root, folder)
    if not os.path.isdir(path):
        if not download:
            raise DataError(f"{path} not found; put the unpacked {folder}/ from {url} under {root}, "
                            f"or allow downloading (--download)")
        _download_cifar(name, root)
    return _to_torch(*zip(*(_read_batch(os.path.join(path, f), label_key, 32)
                            for f in (train_files if train else test_files))))


def _load_imagenet16(root, train, classes=120):
    """NAS-Bench-201's 16x16 ImageNet: keep labels 1..classes (1-based in the files), shifted to 0-based."""
    files = _IN16_TRAIN if train else _IN16_VAL
    folder = next((d for d in (os.path.join(root, _IN16_DIR), root) if os.path.isfile(os.path.join(d, files[0]))), None)
    if folder is None:
        raise DataError(f"{os.path.join(root, _IN16_DIR, files[0])} not found; put NAS-Bench-201's ImageNet16/ folder "
                        f"(train_data_batch_1..10, val_data) under {root}")
    xs, ys = [], []
    for f in files:  # filter file by file: the full set is 1.28 M images, the 120 classes about 150 k
        x, y = _read_batch(os.path.join(folder, f), 'labels', 16)
        keep = (y >= 1) & (y <= classes)
        xs.append(x[keep])
        ys.append(y[keep] - 1)
    return _to_torch(xs, ys)


def _torchvision():
    try:
        import torchvision
        return torchvision
    except Exception as e:  # a broken install fails with all sorts of errors, not only ImportError
        raise DataError(f"this needs torchvision, which failed to import ({type(e).__name__}: {e}); "
                        f"pip install the torchvision release that matches torch {torch.__version__}") from e


def _load_svhn(root, train, download):
    tv = _torchvision()
    path = os.path.join(root, 'train_32x32.mat' if train else 'test_32x32.mat')
    files = 'train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/'
    if not download and not os.path.isfile(path):   # torchvision says 'not found or corrupted' for both
        raise DataError(f"{path} not found; put {files} under {root}, or allow downloading (--download)")
    try:
        ds = tv.datasets.SVHN(root, split='train' if train else 'test', download=download)
    except ModuleNotFoundError as e:   # torchvision reads the .mat files with scipy, which it does not require
        raise DataError(f"torchvision reads SVHN with scipy, which is missing ({e}): pip install scipy") from e
    except Exception as e:
        if not download and isinstance(e, RuntimeError):   # the file is there: its md5 is not the official one
            raise DataError(f"{path} is not the official file (its md5 differs: truncated?); delete it and put "
                            f"{files} there again") from e
        raise DataError(f"SVHN could not be loaded from {root} ({type(e).__name__}: {e}); put {files} there") from e
    return torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8)), torch.from_numpy(ds.labels.astype(np.int64))


def load_dataset(name, root, train=True, download=True):
    """(x, y): all images of one split as a contiguous CPU uint8 tensor N x 3 x H x W, labels int64 N.

    cifar10/cifar100 read root/cifar-10-batches-py or root/cifar-100-python (official pickles, fetched from
    https://www.cs.toronto.edu/~kriz/ when absent and download=True); svhn goes through torchvision;
    imagenet16-120 reads NAS-Bench-201's root/ImageNet16/{train_data_batch_1..10, val_data}.
    """
    root = os.path.expanduser(os.fspath(root))
    if name == 'imagenet':
        raise DataError("imagenet is a class-folder dataset too large to hold in memory; "
                        "use imagenet_loader(root, ...)")
    if name in _CIFAR:
        x, y = _load_cifar(name, root, train, download)
    elif name == 'imagenet16-120':
        x, y = _load_imagenet16(root, train)
    elif name == 'svhn':
        x, y = _load_svhn(root, train, download)
    else:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    classes = DATASETS[name]['num_classes']
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):   # found now, not mid-epoch
        raise DataError(f"{name} in {root} has labels outside 0..{classes - 1} ({int(y.min())}..{int(y.max())}): "
                        "the files are not the official ones; delete them and fetch the dataset again")
    return x, y


def split_indices(n, train_portion, seed=None):
    """DARTS's search split: the first floor(n * portion) indices train the weights, the rest the architecture.

    DARTS takes indices[:split] and indices[split:] in file order; pass a seed to shuffle them first.
    """
    split = int(np.floor(n * train_portion))
    if not 0 < split < n:
        raise DataError(f"train_portion {train_portion} of {n} images leaves one side of the search split empty")
    idx = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return idx[:split].clone(), idx[split:].clone()


# ----------------------------------------------------------------------------------------------
# Batched augmentation. The random numbers are drawn on a CPU generator (a few per image: reproducible
# on any device); the pixels move only in whole-batch tensor ops on the data's device, in uint8 until
# the normalisation. Few, large ops matter on a small CPU: each one is a sync point for its threads.

def _draw(n, generator, size, crop_pad, flip, cutout):
    """The random choices for n images, in a fixed order so a generator state pins a batch down."""
    p = {}
    if crop_pad:
        p['shift'] = torch.randint(0, 2 * crop_pad + 1, (n, 2), generator=generator)
    if flip:
        p['flip'] = torch.randint(0, 2, (n,), generator=generator).bool()
    if cutout:
        p['centre'] = torch.stack([torch.randint(0, size[0], (n,), generator=generator),
                                   torch.randint(0, size[1], (n,), generator=generator)], 1)
    return p


def _store(x, crop_pad, flip):
    """The dataset as the crops are taken from: zero-padded by crop_pad and, with flips, [image | mirror image]
    side by side, so that selecting, padding, cropping and flipping a batch is a single indexing op."""
    x = F.pad(x, (crop_pad,) * 4) if crop_pad else x.contiguous()
    return torch.cat([x, x.flip(3)], 3) if flip else x


def _crop_flip(images, idx, p, size, crop_pad):
    """Images idx of a _store()d tensor, each cropped at its shift and mirrored when its flip is set."""
    h, w = size
    if 'shift' not in p and 'flip' not in p:
        return images[idx]
    s = p['shift'].to(images.device) if 'shift' in p else torch.full((len(idx), 2), crop_pad, device=images.device)
    row, col = s[:, 0], s[:, 1]
    if 'flip' in p:  # the crop at column c, mirrored, is the mirror image's crop at its column 2 pad - c
        col = torch.where(p['flip'].to(images.device), w + 4 * crop_pad - col, col)
    # Every crop is a view into unfold's (N, C, rows, cols, H, W) tensor; one advanced index copies the batch.
    return images.unfold(2, h, 1).unfold(3, w, 1)[idx, :, row, col]


def _cutout(x, p, length):
    """DARTS's cutout: zero a length x length square centred uniformly on the image, clipped at the borders."""
    if 'centre' not in p:
        return x
    c = p['centre'].to(x.device)
    rows, cols = torch.arange(x.shape[2], device=x.device), torch.arange(x.shape[3], device=x.device)
    out_rows = (rows < c[:, :1] - length // 2) | (rows >= c[:, :1] + length // 2)
    out_cols = (cols < c[:, 1:] - length // 2) | (cols >= c[:, 1:] + length // 2)
    keep = out_rows[:, None, :, None] | out_cols[:, None, None, :]
    return x.mul_(keep)  # cheaper than masked_fill_; -0.0 where the value was negative, which equals 0


def _affine(mean, std, device):
    """normalize's per-channel scale and shift: (x / 255 - mean) / std = x * scale - shift."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (1 / (255 * std)).to(device), (mean / std).to(device)


def _normalize(x, scale_shift, dtype):
    scale, shift = scale_shift
    x = x.to(torch.float32).mul_(scale).sub_(shift)  # in float32 for every dtype: uint8 levels need its precision
    return x if dtype == torch.float32 else x.to(dtype)


def normalize(x_uint8, mean, std, dtype=torch.float32):
    """uint8 pixels -> (x / 255 - mean) / std as dtype; mean and std per channel in [0, 1] units."""
    return _normalize(x_uint8, _affine(mean, std, x_uint8.device), dtype)


def _augment(images, idx, p, size, crop_pad, cutout, scale_shift, dtype):
    x = _crop_flip(images, idx, p, size, crop_pad)
    if scale_shift is not None:
        x = _normalize(x, scale_shift, dtype)
    # Cutout after Normalize, as in DARTS: its zeros are the mean colour. Unnormalised, it paints black.
    return _cutout(x, p, cutout)


def augment_batch(x_uint8, generator, crop_pad=4, flip=True, cutout=0, mean=None, std=None, dtype=torch.float32):
    """Crop (zero padding crop_pad), flip and cutout a uint8 batch, in DARTS's order.

    With mean/std the batch comes back normalised as dtype and cutout zeroes the normalised values (the mean
    colour, as DARTS's cutout after Normalize does); without them it stays uint8 and cutout paints black.
    """
    size = x_uint8.shape[-2:]
    p = _draw(len(x_uint8), generator, size, crop_pad, flip, cutout)
    images, idx = _store(x_uint8, crop_pad, flip), torch.arange(len(x_uint8), device=x_uint8.device)
    scale_shift = None if mean is None else _affine(mean, std, x_uint8.device)
    return _augment(images, idx, p, size, crop_pad, cutout, scale_shift, dtype)


# ----------------------------------------------------------------------------------------------
# The loader

class GPULoader:
    """The whole uint8 dataset on `device`; batches of a per-epoch permutation, augmented on the device.

    One CPU torch.Generator (seeded with `seed`) draws every permutation and every augmentation, so runs
    are reproducible, and state_dict() pins the exact position: a resumed run sees the same batches.
    For augmentation the dataset is stored padded and next to its mirror image (3.1x the memory for CIFAR:
    480 MB for its 50k images), so that a batch is selected, cropped and flipped in one op.
    """

    def __init__(self, x, y, batch_size, mean, std, device='cpu', shuffle=True, drop_last=True, augment=True,
                 crop_pad=4, flip=True, cutout=0, seed=0, channels_last=False, dtype=torch.float32):
        if x.dtype != torch.uint8 or x.dim() != 4 or len(x) != len(y):
            raise DataError(f"GPULoader wants uint8 images N x C x H x W and N labels, got {x.dtype} "
                            f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.device = torch.device(device)
        self.n, self.batch_size, self.size = len(x), batch_size, tuple(x.shape[-2:])
        self._scale_shift = _affine(mean, std, self.device)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_pad = crop_pad if augment else 0
        self.flip, self.cutout = flip and augment, cutout if augment else 0
        self.channels_last, self.dtype = channels_last, dtype
        x = x.to(self.device)
        self.images = _store(x, self.crop_pad, self.flip)
        self.labels = y.to(self.device, torch.long)
        self.rank, self.world_size = 0, 1
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.pos = 0, 0   # epoch in progress, batches of it already handed out
        self._perm = None             # this epoch's order (on device), redrawn from _epoch_rng on resume
        self._epoch_rng = None        # generator state just before this epoch's permutation was drawn
        if len(self) == 0 and drop_last:   # an empty test part (a rank of a torchrun on a tiny set) is allowed
            raise DataError(f"{self.n} images make no batch of {batch_size} with drop_last=True")

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def shard(self, rank, world_size):
        """Under torchrun: every rank draws the same permutation and augmentation, and keeps its slice of each
        global batch of batch_size images, so together the ranks see exactly the images one process would."""
        if not 0 <= rank < world_size or self.batch_size < world_size:
            raise DataError(f"rank {rank} of {world_size} cannot take a slice of batches of {self.batch_size}")
        self.rank, self.world_size = rank, world_size
        return self

    def _new_epoch(self):
        self._epoch_rng = self.generator.get_state()
        perm = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        self._perm = perm.to(self.device)
        self.pos = 0

    def _roll(self):
        """Begin an epoch when none has begun or the current one is used up."""
        if self._perm is None:
            self._new_epoch()
        elif self.pos >= len(self):
            self.epoch += 1
            self._new_epoch()

    def _batch(self):
        idx = self._perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        # Random numbers for the whole global batch, so every rank's generator stays in step.
        p = _draw(len(idx), self.generator, self.size, self.crop_pad, self.flip, self.cutout)
        if self.device.type == 'cuda':  # pinned + non_blocking: a plain copy would wait for the GPU every batch
            p = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in p.items()}
        if self.world_size > 1:
            part = lambda t: t.tensor_split(self.world_size)[self.rank]
            idx, p = part(idx), {k: part(v) for k, v in p.items()}
        x = _augment(self.images, idx, p, self.size, self.crop_pad, self.cutout, self._scale_shift, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def __iter__(self):
        """One epoch (the rest of it after load_state_dict)."""
        self._roll()
        while self.pos < len(self):
            yield self._batch()

    def rewind(self):
        """Start again from the first batch of a fresh epoch (for an unshuffled loader: the same batches every
        time, whatever was read before)."""
        self.epoch, self.pos, self._perm = 0, 0, None

    def next_batch(self):
        """The next batch, rolling over into new epochs forever."""
        self._roll()
        return self._batch()

    def state_dict(self):
        return {'n': self.n, 'batch_size': self.batch_size, 'epoch': self.epoch, 'pos': self.pos,
                'rng': self.generator.get_state(), 'epoch_rng': self._epoch_rng}

    def load_state_dict(self, d):
        if (d['n'], d['batch_size']) != (self.n, self.batch_size):
            raise DataError(f"loader state is for {d['n']} images in batches of {d['batch_size']}, "
                            f"not {self.n} in batches of {self.batch_size}")
        self.epoch, self.pos, self._perm, self._epoch_rng = d['epoch'], d['pos'], None, None
        if d['epoch_rng'] is not None:  # redraw this epoch's permutation exactly as it was drawn
            self.generator.set_state(d['epoch_rng'])
            self._new_epoch()
            self.pos = d['pos']
        self.generator.set_state(d['rng'])


# ----------------------------------------------------------------------------------------------
# ImageNet (class folders, too large for memory): torchvision's pipeline, DARTS's mobile augmentation

def imagenet_loader(root, train, batch_size, workers, distributed=False, seed=0):
    """epoch_loader over root/train or root/val, with DARTS's mobile-setting augmentation."""
    tv = _torchvision()
    T = tv.transforms
    folder = os.path.join(os.path.expanduser(os.fspath(root)), 'train' if train else 'val')
    if not os.path.isdir(folder):
        raise DataError(f"{folder} not found; ImageNet wants one folder per class under {root}/train and {root}/val")
    norm = T.Normalize(DATASETS['imagenet']['mean'], DATASETS['imagenet']['std'])
    if train:
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), T.ToTensor(), norm])
    else:
        tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    other = os.path.join(os.path.dirname(folder), 'val' if train else 'train')
    try:
        ds = tv.datasets.ImageFolder(folder, tf)
        # ImageFolder numbers each split's classes by their sorted folder names, on its own: a class folder that one
        # split lacks would shift the other's labels silently
        theirs = tv.datasets.folder.find_classes(other)[0] if os.path.isdir(other) else ds.classes
    except FileNotFoundError as e:   # no class folder (the official validation archive unpacks flat), or an empty one
        root = os.path.dirname(folder)
        raise DataError(f"{e} ImageNet wants one folder of images per class in {root}/train and {root}/val "
                        f"(the official validation archive unpacks flat: sort it into class folders)") from None
    if theirs != ds.classes:
        odd = sorted(set(theirs) ^ set(ds.classes))
        raise DataError(f"{folder} and {other} hold different class folders ({len(ds.classes)} and {len(theirs)}, "
                        f"e.g. {odd[0]!r}): their labels would not agree")
    if len(ds.classes) > DATASETS['imagenet']['num_classes']:   # found now, not mid-epoch
        raise DataError(f"{folder} holds {len(ds.classes)} class folders, more than ImageNet's "
                        f"{DATASETS['imagenet']['num_classes']}")
    return epoch_loader(ds, batch_size, workers, train, distributed, seed)


def epoch_loader(ds, batch_size, workers, train, distributed=False, seed=0):
    """A DataLoader whose epochs are begun by set_loader_epoch: epoch e's order, and the random state its workers
    augment with, then follow (seed, rank, e) alone, so a resumed run reads what an uninterrupted one read. The
    workers start afresh each epoch for that (a persistent worker's random state carries over the epochs before
    it): a second or two against an ImageNet epoch's minutes. Without workers the augmentation draws from the
    main process's generator, which the checkpoint holds."""
    sampler = torch.utils.data.distributed.DistributedSampler(ds, shuffle=train, seed=seed) if distributed else None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                                         num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=train,
                                         generator=torch.Generator())
    loader.seed = seed
    return loader


def set_loader_epoch(loader, epoch, rank=0):
    """Begin epoch of an epoch_loader: its shuffle and its workers' seeds (drawn from loader.generator when the
    epoch's iterator is made), or under torchrun DistributedSampler's order, follow (seed, rank, epoch)."""
    loader.generator.manual_seed(loader.seed * 10**9 + epoch * 10**4 + rank)
    if hasattr(loader.sampler, 'set_epoch'):
        loader.sampler.set_epoch(epoch)


# ----------------------------------------------------------------------------------------------
# Small fake datasets in the official formats, for the tests and the docs

def _fake_images(rng, labels, size, num_classes):
    """A per-class mean colour plus noise: random, yet learnable in a few steps."""
    colours = np.random.default_rng(12345).uniform(40, 215, size=(max(num_classes, 1), 3, 1, 1))
    x = colours[labels % len(colours)] + rng.normal(0, 40, size=(len(labels), 3, size, size))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(len(labels), 3 * size * size)


def _dump(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=4)


def write_cifar_like(root, name, n_train, n_test, num_classes=None, seed=0):
    """Write small random data in the official layout of `name` under root and return the folder written.

    cifar10: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; cifar100: cifar-100-python/
    {train, test, meta} with fine and coarse labels; imagenet16-120: ImageNet16/{train_data_batch_1..10,
    val_data} with 1-based labels, plus n // 2 extra images labelled 121..1000 that the loader must drop,
    so load_dataset returns exactly n_train / n_test images. num_classes defaults to the dataset's own.
    """
    if name not in _CIFAR and name != 'imagenet16-120':
        raise DataError(f"write_cifar_like writes cifar10, cifar100 or imagenet16-120, not {name!r}")
    rng = np.random.default_rng(seed)
    root = os.path.expanduser(os.fspath(root))
    k = num_classes or DATASETS[name]['num_classes']
    labels = lambda n: rng.integers(0, k, n)
    if name in _CIFAR:
        folder, _, _, train_files, test_files, key = _CIFAR[name]
        out = os.path.join(root, folder)
        os.makedirs(out, exist_ok=True)
        for files, n, what in ((train_files, n_train, 'training'), (test_files, n_test, 'testing')):
            y = labels(n)
            x = _fake_images(rng, y, 32, k)
            for i, chunk in enumerate(np.array_split(np.arange(n), len(files))):
                d = {'batch_label': f'{what} batch {i + 1} of {len(files)}', 'data': x[chunk],
                     'filenames': [f'fake_{j:05d}.png' for j in chunk]}
                if name == 'cifar10':
                    d['labels'] = y[chunk].tolist()
                else:
                    d['fine_labels'], d['coarse_labels'] = y[chunk].tolist(), (y[chunk] // 5).tolist()
                _dump(os.path.join(out, files[i]), d)
        if name == 'cifar10':
            _dump(os.path.join(out, 'batches.meta'), {'label_names': [f'class_{i}' for i in range(10)],
                                                      'num_cases_per_batch': 10000, 'num_vis': 3072})
        else:
            _dump(os.path.join(out, 'meta'), {'fine_label_names': [f'fine_{i}' for i in range(100)],
                                              'coarse_label_names': [f'coarse_{i}' for i in range(20)]})
        return out
    out = os.path.join(root, _IN16_DIR)  # imagenet16-120
    os.makedirs(out, exist_ok=True)
    for files, n in ((_IN16_TRAIN, n_train), (_IN16_VAL, n_test)):
        extra = max(1, n // 2)  # images of classes 121..1000, interleaved at random
        y = np.concatenate([labels(n) + 1, rng.integers(121, 1001, extra)])[rng.permutation(n + extra)]
        x = _fake_images(rng, y - 1, 16, min(k, 120))
        for i, chunk in enumerate(np.array_split(np.arange(len(y)), len(files))):
            _dump(os.path.join(out, files[i]), {'data': x[chunk], 'labels': y[chunk].tolist()})
    return out


# ----------------------------------------------------------------------------------------------
# python data.py --fake: loader throughput (images per second, augmentation included)

def _throughput(argv=None):
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Measure GPULoader throughput.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument('--dataset', default='cifar10', choices=[d for d in DATASETS if d != 'imagenet'],
                    help="the dataset's training images")
    ap.add_argument('--data', default='./data', help="root folder of the dataset files")
    ap.add_argument('--fake', action='store_true', help="50,000 random images instead of the real files")
    ap.add_argument('--download', action='store_true', help="fetch the official files when absent")
    ap.add_argument('--batch-size', type=int, default=256, help="images per batch")
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                    help="where the batches are made")
    ap.add_argument('--cutout', type=int, default=16, help="cutout square side in pixels, 0 for none")
    ap.add_argument('--epochs', type=int, default=2, help="timed passes over the images")
    ap.add_argument('--threads', type=int, default=2, help="torch CPU threads")
    ap.add_argument('--channels-last', action='store_true', help="batches in channels-last memory, as search.py's")
    a = ap.parse_args(argv)
    for name in ('batch_size', 'epochs', 'threads'):
        if getattr(a, name) < 1:
            ap.exit(2, f"error: --{name.replace('_', '-')} must be at least 1\n")
    if a.cutout < 0:
        ap.exit(2, 'error: --cutout must not be negative\n')
    if not a.data:   # as search.py's and train.py's --data
        ap.exit(2, 'error: --data: an empty path (an unset shell variable?)\n')
    try:
        device = torch.device(a.device)
    except RuntimeError:
        ap.exit(2, f"error: --device {a.device}: not a device (cpu, cuda, cuda:1, mps)\n")
    present = {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(
        device.type, lambda: device.type == 'cpu')   # 'meta' and the like hold no data
    if not present() or (device.type == 'cuda' and (device.index or 0) >= torch.cuda.device_count()):
        ap.exit(2, f"error: --device {a.device}: this torch sees no such device\n")
    torch.set_num_threads(a.threads)
    cfg = DATASETS[a.dataset]
    if a.cutout > cfg['size']:
        ap.exit(2, f"error: --cutout {a.cutout} is larger than the {cfg['size']}x{cfg['size']} images\n")
    if a.fake:
        x = torch.randint(0, 256, (50000, 3, cfg['size'], cfg['size']), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, cfg['num_classes'], (50000,))
    else:
        x, y = load_dataset(a.dataset, a.data, train=True, download=a.download)
    loader = GPULoader(x, y, a.batch_size, cfg['mean'], cfg['std'], device=device, crop_pad=cfg['crop_pad'],
                       cutout=a.cutout, channels_last=a.channels_last)
    sync = torch.cuda.synchronize if loader.device.type == 'cuda' else (lambda: None)
    loader.next_batch()  # warm-up
    # On a CPU shared with other busy processes, OpenMP's spin-waiting makes every multi-threaded op wait for a
    # descheduled thread: expect several times less there (OMP_WAIT_POLICY=PASSIVE or --threads 1 avoid it).
    for epoch in range(a.epochs):
        sync()
        t0, seen = time.perf_counter(), 0
        for xb, yb in loader:
            seen += len(xb)
        sync()
        dt = time.perf_counter() - t0
        print(f"{a.dataset}: epoch {epoch}, {seen} images in {dt:.2f} s = {seen / dt:,.0f} images/s "
              f"(batch {a.batch_size}, crop pad {cfg['crop_pad']}, flip, cutout {a.cutout}, {loader.device}, "
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == '__main__':
    try:
        _throughput()
    except DataError as e:   # a missing or corrupt dataset: one line that says how to get it
        raise SystemExit(f'error: {e}') from None
