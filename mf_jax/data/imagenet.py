"""ImageNet training images: the ADM centre crop and two ways to read them.

Sources are random-access: `len(source)` images, `source[i]` -> (PIL RGB
image, class index). Class indices follow the sorted WordNet ids, which is
both the order of a class-per-folder tree's sorted folder names and TFDS
`imagenet2012`'s label order.
"""

import os

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM's `center_crop_arr`, which DiT and MeanFlow latents are made with.

  Halve with BOX filtering while the short side is at least 2 * size (cheap
  and alias-free), then one BICUBIC resize to short side = size, then crop
  the centre. Returns uint8 (size, size, 3).
  """
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(s // 2 for s in image.size),
                         resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(s * scale) for s in image.size),
                       resample=Image.BICUBIC)
  pixels = np.asarray(image)
  top = (pixels.shape[0] - size) // 2
  left = (pixels.shape[1] - size) // 2
  return pixels[top:top + size, left:left + size]


class FolderSource:
  """A class-per-folder tree (ImageNet's train/ layout); sorted, so stable."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"No image folder at {root!r}.")
    self.classes = sorted(d for d in os.listdir(root)
                          if os.path.isdir(os.path.join(root, d)))
    self.items = []
    for label, name in enumerate(self.classes):
      folder = os.path.join(root, name)
      self.items.extend(
          (os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
          if f.lower().endswith(IMAGE_EXTENSIONS))
    if not self.items:
      raise FileNotFoundError(f"No images in class folders under {root!r}.")

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    path, label = self.items[index]
    with Image.open(path) as image:
      image.load()
      return image, label


class TfdsSource:
  """TFDS `imagenet2012` train split, built once from the manual downloads.

  TFDS cannot download ImageNet: `manual_dir` must hold the official
  ILSVRC2012_img_train.tar (and _val.tar). Building takes hours, once.
  """

  def __init__(self, data_dir: str, manual_dir: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = data_dir or os.path.expanduser("~/tensorflow_datasets")
    builder = tfds.builder("imagenet2012", data_dir=data_dir,
                           file_format="array_record")
    if not os.path.isdir(builder.data_dir):
      if not manual_dir:
        raise FileNotFoundError(
            f"imagenet2012 is not built in {data_dir}; pass --tfds_manual_dir "
            "with the ILSVRC2012 tar files to build it.")
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    self._source = builder.as_data_source(split="train")

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
    return Image.fromarray(np.asarray(record["image"])), int(record["label"])
