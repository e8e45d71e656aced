"""The PyTorch peer of benchmarks/training.py: the same DeepID, Adam and batches, on the CPU.

    /work/venv_torch/bin/python benchmarks/training_torch.py --weights=W.npz --out=O.npz
        [--batch=64] [--steps=30] [--forward_batch=512]

Run by benchmarks/training.py in a venv of its own (torch, numpy; never a
project dependency). ``--weights`` holds badnet's params as ``<layer>/<name>``
arrays in Keras layouts, ``train_images`` (uint8 NHWC), ``train_labels``,
``mask`` (conv_3's kept channels) and ``probe`` (images whose classes are
written to ``--out`` so the caller can check that this is the same net).

The train step is what badnet's fine-tuning does: softmax cross-entropy on
raw 0..255 pixels, conv_3's pruned channels silenced in the forward pass and
their weights set back to zero after each Adam step, batches of shuffled host
images converted on the fly. Prints ``train images/s: N`` and
``forward images/s: N`` (forward in batches of ``--forward_batch``, no
gradients, as badnet's evaluation runs). The train rate is the best of 3
rounds of ``--steps`` steps.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional

ROUNDS = 3


class DeepID(nn.Module):
  """The CSAW DeepID in PyTorch's NCHW layout."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv_1, self.conv_2 = nn.Conv2d(3, 20, 4), nn.Conv2d(20, 40, 3)
    self.conv_3, self.conv_4 = nn.Conv2d(40, 60, 3), nn.Conv2d(60, 80, 2)
    self.fc_1, self.fc_2 = nn.Linear(1200, 160), nn.Linear(960, 160)
    self.output = nn.Linear(160, num_classes)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = functional.max_pool2d(functional.relu(self.conv_1(x)), 2)
    x = functional.max_pool2d(functional.relu(self.conv_2(x)), 2)
    x = functional.max_pool2d(functional.relu(self.conv_3(x)), 2) * mask[None, :, None, None]
    fc_1 = self.fc_1(x.flatten(1))
    fc_2 = self.fc_2(functional.relu(self.conv_4(x)).flatten(1))
    return self.output(functional.relu(fc_1 + fc_2))


def _load(model: DeepID, arrays: dict[str, np.ndarray]) -> None:
  """badnet's Keras-layout params into the NCHW net (kernels transposed, flatten order fixed)."""
  flat_shapes = {'fc_1': (5, 4, 60), 'fc_2': (4, 3, 80)}  # (H, W, C) each dense layer reads
  with torch.no_grad():
    for name, module in model.named_children():
      kernel = arrays[f'{name}/kernel']
      if name.startswith('conv'):
        kernel = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
      else:
        if name in flat_shapes:  # Keras flattens (H, W, C); PyTorch flattens (C, H, W)
          kernel = kernel.reshape(*flat_shapes[name], -1).transpose(2, 0, 1, 3).reshape(
              kernel.shape)
        kernel = kernel.T
      module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
      module.bias.copy_(torch.from_numpy(arrays[f'{name}/bias']))


def _nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(images).permute(0, 3, 1, 2).float().contiguous()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--weights', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--forward_batch', type=int, default=512)
  args = parser.parse_args()
  with np.load(args.weights) as stored:
    arrays = dict(stored)
  images, labels = arrays['train_images'], arrays['train_labels'].astype(np.int64)
  model = DeepID(len(arrays['output/bias']))
  _load(model, arrays)
  mask = torch.from_numpy(arrays['mask'])
  pruned = mask == 0
  with torch.no_grad():
    probe = model(_nchw(arrays['probe']), mask).argmax(1).numpy()

  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
  rng = np.random.default_rng(0)

  def step() -> None:
    rows = rng.choice(len(labels), args.batch, replace=False)
    loss = functional.cross_entropy(model(_nchw(images[rows]), mask),
                                    torch.from_numpy(labels[rows]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():  # the pruned channels held at exactly zero, as badnet's fine-pruning
      model.conv_3.weight[pruned] = 0
      model.conv_3.bias[pruned] = 0

  for _ in range(5):
    step()  # warm-up: allocator and oneDNN primitives
  best = float('inf')
  for _ in range(ROUNDS):  # the best round, as badnet's rate is its best epoch
    start = time.perf_counter()
    for _ in range(args.steps):
      step()
    best = min(best, time.perf_counter() - start)
  train_rate = args.steps * args.batch / best

  forward_images = _nchw(images[:args.forward_batch])
  with torch.no_grad():
    model(forward_images, mask)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 3.0:
      model(forward_images, mask)
      count += len(forward_images)
  forward_rate = count / (time.perf_counter() - start)
  np.savez(args.out, probe_classes=probe)
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
  print(f'train images/s: {train_rate:.0f}')
  print(f'forward images/s: {forward_rate:.0f}')


if __name__ == '__main__':
  main()
