"""TensorBoard's embedding projector: the features of fixed test images, before training and from the tested
checkpoint, each image its own thumbnail (a Lightning callback, `callbacks.projector`)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from google.protobuf import text_format
from lightning.pytorch.callbacks import Callback
from tensorboard.plugins.projector.projector_config_pb2 import EmbeddingInfo, ProjectorConfig, SpriteMetadata
from torchvision.utils import save_image

from cifarlab.inspection import tensorboard
from cifarlab.run_folder import atomic_write

PROJECTOR_COLUMNS = ["image", "true", "predicted", "correct"]  # image: the index in the test set
PROJECTOR_DIR = "projector"


class Projector(Callback):
    """TensorBoard's projector on a fixed set of test images (`images` of them, chosen by seed; the whole test set if
    smaller), before training and after testing (the tested checkpoint), each a tensor of its own:

      flatten @ step S   (N, 1024) the flattened features fc1 receives
      hidden @ step S    (N, 64)   the hidden layer fc2 receives

    each point with its image as thumbnail and the metadata columns image (its index in the test set), true,
    predicted and correct, to colour or search by. Features are computed in eval mode and in fp32.

    Written with TensorBoard's projector config rather than SummaryWriter.add_embedding, which writes 2.5x the bytes
    (full-precision text, a sprite per tensor) and rewrites the config with its own process's tensors alone (a
    resumed run would lose its "before"): docs/performance.md.
    """

    def __init__(self, images: int = 1000, seed: int = 0):
        self.images, self.seed = images, seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a resumed run wrote "before" when it first started
            self.write(trainer, pl_module, "before training")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "tested")

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> None:
        writer = tensorboard(trainer)
        if writer is None:
            return
        dm = trainer.datamodule
        order = torch.randperm(len(dm.test_y), generator=torch.Generator().manual_seed(self.seed))
        index = order[: self.images].sort().values
        images, labels = dm.test_x[index.to(dm.test_x.device)], dm.test_y[index.to(dm.test_y.device)].cpu()
        model, was_training = pl_module.model, pl_module.training
        model.eval()
        try:
            with torch.autocast(pl_module.device.type, enabled=False):
                parts = [model.features(dm.normalizer(batch).float()) for batch in images.split(500)]
        finally:
            model.train(was_training)
        features = {k: torch.cat([p[k] for p in parts]).cpu() for k in ("flatten", "hidden", "logits")}
        predicted = features["logits"].argmax(1)
        metadata = [[str(i), dm.classes[t], dm.classes[p], str(t == p)]
                    for i, t, p in zip(index.tolist(), labels.tolist(), predicted.tolist())]
        write_projector(Path(writer.get_logdir()), trainer.global_step, when,
                        {k: features[k] for k in ("flatten", "hidden")}, metadata, images.cpu())


def write_projector(log_dir: Path, step: int, when: str, tensors: dict[str, torch.Tensor], metadata: list[list[str]],
                    images: torch.Tensor) -> None:
    """Tensors (N, D_k) of the same N points, their metadata rows and uint8 images (N, 3, H, W) -> files under
    log_dir/projector/ and an entry per tensor in log_dir/projector_config.pbtxt, which keeps the entries of other
    steps (a tensor written again under its name replaces its entry)."""
    folder = log_dir / PROJECTOR_DIR
    step_dir = folder / f"step-{step:06d}-{when.replace(' ', '-')}"
    step_dir.mkdir(parents=True, exist_ok=True)
    sprite = folder / f"sprite-{len(images)}.png"  # the same images at every step: one sprite
    if not sprite.exists():
        save_image(images.float() / 255, sprite, nrow=math.ceil(math.sqrt(len(images))), padding=0)
    (step_dir / "metadata.tsv").write_text("\n".join("\t".join(row) for row in [PROJECTOR_COLUMNS, *metadata]) + "\n")
    for name, tensor in tensors.items():  # 5 significant digits: far finer than any projection shows
        np.savetxt(step_dir / f"{name}.tsv", tensor.numpy(), fmt="%.5g", delimiter="\t")
    config_path = log_dir / "projector_config.pbtxt"
    config = text_format.Parse(config_path.read_text(), ProjectorConfig()) if config_path.exists() else ProjectorConfig()
    entries = [EmbeddingInfo(tensor_name=f"{name} @ step {step} ({when})", tensor_shape=list(tensor.shape),
                             tensor_path=str((step_dir / f"{name}.tsv").relative_to(log_dir)),
                             metadata_path=str((step_dir / "metadata.tsv").relative_to(log_dir)),
                             sprite=SpriteMetadata(image_path=str(sprite.relative_to(log_dir)),
                                                   single_image_dim=list(images.shape[-2:])))
               for name, tensor in tensors.items()]
    names = {e.tensor_name for e in entries}
    # newest first: the projector opens on the first tensor, so on the tested features once there are any
    kept = ProjectorConfig(embeddings=entries + [e for e in config.embeddings if e.tensor_name not in names])
    atomic_write(config_path, lambda f: f.write(text_format.MessageToString(kept).encode()))  # a kill leaves it whole
