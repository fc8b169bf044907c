"""Oxford-IIIT Pet (37 breeds, with trimap segmentation) through torchvision's reader, resized
to a square and read once into memory with binary foreground masks."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sslpipe.data.files import require_files

from sslpipe.data.split import Split, Splits
from sslpipe.data.torchvision_sets import _hold_out_val

# The trimaps' pixel values (the data set's README): 1 pet, 2 background, 3 the unclassified
# border around the pet's outline.
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3


def trimap_to_mask(trimap: np.ndarray, border: int) -> np.ndarray:
    """(H, W) trimap -> uint8 (H, W) mask, foreground 1; the border pixels get `border` (0 or 1)."""
    if border not in (0, 1):
        raise ValueError(f"border must be 0 (background) or 1 (foreground), got {border}")
    return ((trimap == TRIMAP_PET) | ((trimap == TRIMAP_BORDER) & bool(border))).astype(np.uint8)


def _read(ds, image_size: int, border: int) -> Split:
    images, labels, masks = [], [], []
    for i in range(len(ds)):
        image, (label, trimap) = ds[i]
        images.append(np.asarray(image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)))
        masks.append(trimap_to_mask(np.asarray(trimap.resize((image_size, image_size), Image.NEAREST)), border))
        labels.append(label)
    return Split(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                 torch.as_tensor(labels, dtype=torch.long), torch.from_numpy(np.stack(masks)))


def load_pets(root: str, download: bool = False, image_size: int = 128, border: int = 1, val_size: int = 368,
              split_seed: int = 0) -> Splits:
    """`<root>/oxford-iiit-pet/{images/*.jpg, annotations/{trainval,test}.txt, annotations/trimaps/*.png}`:
    the 3680 trainval images (less `val_size` held out, stratified) and 3669 test images,
    squashed to image_size x image_size (bilinear; masks nearest), masks in `Split.masks`."""
    from torchvision.datasets import OxfordIIITPet

    base = "oxford-iiit-pet"
    if not download:
        require_files("pets", root, [f"{base}/images", f"{base}/annotations/trimaps", f"{base}/annotations/trainval.txt",
                                     f"{base}/annotations/test.txt"],
                      "Extract images.tar.gz and annotations.tar.gz into that folder, or set dataset.download=true.")
    try:
        train = OxfordIIITPet(root, split="trainval", target_types=["category", "segmentation"], download=download)
        test = OxfordIIITPet(root, split="test", target_types=["category", "segmentation"], download=download)
    except FileNotFoundError as err:  # an id listed in trainval/test.txt without its image or trimap
        raise FileNotFoundError(f"pets: under root='{root}/{base}' a listed file is missing: {err.filename}") from None
    return _hold_out_val(_read(train, image_size, border), _read(test, image_size, border), list(train.classes),
                         val_size, split_seed)
