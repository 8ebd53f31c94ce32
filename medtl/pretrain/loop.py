"""``pretrain``: masked-autoencoder pretraining of a timm backbone on unlabelled images.

Only the manifest's ``train`` split is read (labels, if any, are ignored): validation and
test images never reach pretraining. With ``pretrain.data`` the images come from a corpus of
its own instead (:mod:`medtl.data.corpus`), pooled from several sources, with copies of the
manifest's validation and test images left out. Masks are drawn inside the training step, on the model's
device, one generator per sample seeded from ``(seed, epoch, sample)``, so a run is
reproducible, resumable and independent of how batches are sharded across processes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from medtl import __version__
from medtl.artifacts import EncoderCard, Normalisation, WeightsProvenance
from medtl.data.corpus import Corpus, CorpusSource, build_corpus, corpus_dataset
from medtl.data.dataset import DataConfig, build_dataset, input_stats
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError
from medtl.io import atomic_open, write_json
from medtl.models import check_backbone
from medtl.pretrain.cnn import CNNMAE
from medtl.pretrain.mae import MaskedAutoencoder, build_mae
from medtl.pretrain.masking import (
    MASKING,
    EntropyMasking,
    MaskingStrategy,
    build_masking,
    patch_entropy,
)
from medtl.train import FitResult, OptimConfig, StepContext, dist_info, fit

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
META_FILE = "meta.json"
CORPUS_HASHES = "corpus_hashes.json"  # the leakage guard's hash cache, reused on resume
CORPUS_EXCLUDED = "corpus_excluded.json"  # corpus images left out, and the row each copies


class PretrainConfig(OptimConfig):
    """The ``pretrain`` recipe section: the shared optimisation keys (:class:`OptimConfig`,
    with pretraining's defaults) and what masked pretraining adds."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(
        "convnext_atto",
        description="timm ConvNeXt, ViT, or BatchNorm CNN (EfficientNet, ResNet) name",
    )
    weights: str | None = Field(
        None,
        description="starting weights (continued pretraining): a pretrained source "
        "('imagenet:efficientnet_lite0', see `medtl list sources`) or a local file (a timm "
        "checkpoint, a medtl encoder); its classifier is left out; nothing is downloaded",
    )
    masking: str = Field("entropy", description="masking strategy: entropy or random")
    mask_ratio: float | None = Field(
        None, gt=0, lt=1, description="share of patches masked; default 0.6 ConvNeXt, 0.75 ViT"
    )
    temperature: float = Field(
        1.0, gt=0, description="entropy masking: softmax temperature on standardised entropy"
    )
    random_share: float = Field(
        0.0, ge=0, le=1, description="entropy masking: share of the masked count drawn uniformly"
    )
    entropy_bins: int = Field(32, ge=2, description="entropy masking: histogram bins on [0, 1]")
    # the shared optimisation keys, with pretraining's defaults
    epochs: int = Field(100, ge=1)
    lr: float = Field(1.5e-3, gt=0, description="base learning rate (AdamW, warm-up then cosine)")
    warmup_epochs: float = Field(5.0, ge=0)
    grad_clip: float | None = Field(3.0, gt=0, description="gradient-norm clip (null: none)")
    decoder_dim: int | None = Field(None, ge=8, description="decoder width (default: the MAE's)")
    decoder_depth: int | None = Field(None, ge=0, description="decoder blocks (default: the MAE's)")
    mask_unit: int | None = Field(
        None,
        ge=1,
        description="BatchNorm CNNs: pixels per mask cell; default the network stride (32); "
        "16 or 8 give a finer grid (128 px: 8 x 8 or 16 x 16 cells instead of 4 x 4)",
    )
    augment: Literal["none", "light", "medium"] = Field(
        "light", description="train-time augmentation"
    )
    data: list[CorpusSource] | None = Field(
        None,
        description="a pretraining corpus of its own: sources of unlabelled images "
        "({manifest, root} | folder | dicom | nifti | npz, with weight, exclude, splits); "
        "copies of the recipe manifest's validation / test images are left out (default: "
        "the manifest's train split)",
    )
    picture_every: int = Field(
        10, ge=0, description="epochs between mask / reconstruction grids (0 = only the last)"
    )
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, name: str) -> str:
        try:
            return check_backbone(name)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("masking")
    @classmethod
    def _masking(cls, name: str) -> str:
        return MASKING.validate(name)

    def model_post_init(self, __context: Any) -> None:
        if self.weights:
            from medtl.sources import check_spec

            try:
                check_spec(self.weights, self.backbone)
            except ValueError as exc:
                raise ConfigError(
                    f"pretrain.weights: {str(exc).replace('finetune.', 'pretrain.')}"
                ) from None


@dataclass
class PretrainResult:
    encoder: Path
    card: EncoderCard
    history: list[dict[str, float]]

    @property
    def meta(self) -> dict[str, Any]:
        """The encoder card as the JSON object written to ``meta.json``."""
        return self.card.model_dump(mode="json")


def build_strategy(cfg: PretrainConfig, mae: MaskedAutoencoder) -> MaskingStrategy:
    ratio = cfg.mask_ratio if cfg.mask_ratio is not None else mae.default_mask_ratio
    if cfg.masking == "entropy":
        return build_masking(
            "entropy",
            ratio=ratio,
            temperature=cfg.temperature,
            random_share=cfg.random_share,
            bins=cfg.entropy_bins,
        )
    return build_masking(cfg.masking, ratio=ratio)


def draw_masks(
    strategy: MaskingStrategy, x: torch.Tensor, patch: int, seeds: list[int]
) -> torch.Tensor:
    """One mask per image ``[B, h, w]``, each from its own generator on ``x``'s device."""
    masks = []
    for i, seed in enumerate(seeds):
        g = torch.Generator(device=x.device).manual_seed(seed)
        masks.append(strategy(x[i : i + 1], patch, g))
    return torch.cat(masks)


def mae_step(strategy: MaskingStrategy, patch: int) -> Any:
    def step(
        model: torch.nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        x = batch["image"]
        out = model(x, draw_masks(strategy, x, patch, ctx.sample_seeds))
        return {"loss": out["loss"], "output": out["pred"]}

    return step


def build_model(
    cfg: PretrainConfig,
    data_cfg: DataConfig,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> MaskedAutoencoder:
    """The MAE of ``cfg.backbone``; ``mean`` / ``std`` default to the backbone's."""
    options: dict[str, Any] = {"mean": mean, "std": std, "weights": cfg.weights}
    if cfg.decoder_dim is not None:
        options["decoder_dim"] = cfg.decoder_dim
    if cfg.decoder_depth is not None:
        options["decoder_depth"] = cfg.decoder_depth
    if cfg.mask_unit is not None:
        options["mask_unit"] = cfg.mask_unit
    mae = build_mae(
        cfg.backbone, in_chans=data_cfg.channels, img_size=data_cfg.image_size, **options
    )
    if data_cfg.image_size % mae.patch_size:
        raise ConfigError(
            f"data.loader.image_size {data_cfg.image_size} is not a multiple of the {cfg.backbone} "
            f"patch size {mae.patch_size}; use e.g. {mae.patch_size * max(1, round(data_cfg.image_size / mae.patch_size))}"
        )
    freeze_unused(mae, data_cfg)
    return mae


def freeze_unused(mae: MaskedAutoencoder, data_cfg: DataConfig) -> list[str]:
    """Freeze parameters the MAE never uses (e.g. a ConvNeXt's classifier-head norm): they
    would get no gradient, which DistributedDataParallel refuses. Found by one dummy step,
    after which the buffers are restored: BatchNorm's running statistics (ImageNet's, when
    continuing from a source) must not learn from the dummy image."""
    buffers = {n: b.clone() for n, b in mae.named_buffers()}
    x = torch.rand(1, data_cfg.channels, data_cfg.image_size, data_cfg.image_size)
    grid = (data_cfg.image_size // mae.patch_size,) * 2
    mask = torch.zeros(1, *grid, dtype=torch.bool)
    mask.view(-1)[: max(1, mask.numel() // 2)] = True
    mae.zero_grad(set_to_none=True)
    mae(x, mask)["loss"].backward()
    unused = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in mae.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    with torch.no_grad():
        for n, b in mae.named_buffers():
            b.copy_(buffers[n])
    return unused


def pretrain(
    cfg: PretrainConfig,
    manifest: Manifest,
    root: Path,
    data_cfg: DataConfig,
    out: Path,
    seed: int = 0,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    recipe: dict[str, Any] | None = None,
    stop_after_steps: int | None = None,
) -> PretrainResult:
    """Pretrain, then write ``encoder.safetensors`` + ``meta.json``, ``history.csv``,
    ``loss.png`` and ``masks_epochNNN.png`` grids into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    mean, std = input_stats(manifest, root, data_cfg)
    mae = build_model(cfg, data_cfg, mean, std)
    strategy = build_strategy(cfg, mae)
    run = _Run(cfg, manifest, root, data_cfg, out, seed, recipe or {})
    data, shown, corpus = _datasets(run)
    pictures = PictureWriter(
        shown, strategy, mae.patch_size, out, cfg.picture_every, cfg.epochs, seed
    )
    # channels-last by default (null: on for CPU) for the masked BatchNorm CNNs only, where
    # it measured faster (docs/performance.md); ConvNeXt and ViT MAEs stay contiguous
    auto = None if isinstance(mae, CNNMAE) else False
    channels_last = auto if cfg.channels_last is None else cfg.channels_last
    schedule = cfg.schedule(checkpoint_every=cfg.checkpoint_every, channels_last=channels_last)
    groups = param_groups(mae, cfg.weight_decay)
    start = time.perf_counter()
    result = fit(
        mae,
        mae_step(strategy, mae.patch_size),
        groups,
        data,
        schedule,
        out,
        seed=seed,
        device=device,
        on_epoch_end=pictures,
        resume=resume,
        progress=progress,
        stop_after_steps=stop_after_steps,
    )
    card = _encoder_card(run, mae, strategy, result, corpus, time.perf_counter() - start)
    if result.extra.get("interrupted"):
        return PretrainResult(out / ENCODER_FILE, card, result.history)
    rank, _ = dist_info()
    if rank == 0:
        export_encoder(mae, out / ENCODER_FILE)
        card.save(out / META_FILE)
        plot_loss(result.history, out / "loss.png")
    return PretrainResult(out / ENCODER_FILE, card, result.history)


@dataclass(frozen=True)
class _Run:
    """What one :func:`pretrain` call was given."""

    cfg: PretrainConfig
    manifest: Manifest
    root: Path
    data_cfg: DataConfig
    out: Path
    seed: int
    recipe: dict[str, Any]


def _datasets(run: _Run) -> tuple[Any, Any, Corpus | None]:
    """The training images (augmented), the same images plain for the mask pictures, and the
    corpus they come from when ``pretrain.data`` names one (else the manifest's train split)."""
    cfg, data_cfg, seed = run.cfg, run.data_cfg, run.seed
    train_cfg = data_cfg.model_copy(update={"augment": cfg.augment})
    plain_cfg = data_cfg.model_copy(update={"augment": "none", "cache": "none"})
    if not cfg.data:
        data = build_dataset(run.manifest, "train", run.root, train_cfg, train=True, seed=seed)
        return data, build_dataset(run.manifest, "train", run.root, plain_cfg), None
    corpus = build_corpus(
        cfg.data,
        run.manifest,
        run.root,
        run.out / CORPUS_HASHES,
        workers=max(4, data_cfg.num_workers),
    )
    write_json(run.out / CORPUS_EXCLUDED, corpus.excluded)
    data = corpus_dataset(corpus, train_cfg, train=True, seed=seed)
    return data, corpus_dataset(corpus, plain_cfg), corpus


def _encoder_card(
    run: _Run,
    mae: MaskedAutoencoder,
    strategy: MaskingStrategy,
    result: FitResult,
    corpus: Corpus | None,
    seconds: float,
) -> EncoderCard:
    """The ``meta.json`` of the encoder: its input, masking, training and provenance."""
    cfg, data_cfg = run.cfg, run.data_cfg
    return EncoderCard(
        medtl_version=__version__,
        backbone=cfg.backbone,
        in_chans=data_cfg.channels,
        image_size=data_cfg.image_size,
        patch_size=mae.patch_size,
        normalize=Normalisation(
            source=data_cfg.normalize,
            mean=mae.mean.flatten().tolist(),
            std=mae.std.flatten().tolist(),
        ),
        masking=describe_strategy(cfg.masking, strategy),
        epochs=cfg.epochs,
        epochs_run=len(result.history),
        final_loss=result.history[-1]["train_loss"] if result.history else None,
        train_images=len(corpus.items) if corpus else len(run.manifest.split("train")),
        manifest_sha256=run.manifest.sha256,
        seed=run.seed,
        seconds=seconds,
        init_weights=cfg.weights,
        weights=weights_provenance(mae, cfg.weights),
        config=cfg.model_dump(mode="json"),
        recipe=run.recipe,
        corpus=corpus.record if corpus else None,
    )


def weights_provenance(mae: MaskedAutoencoder, weights: str | None) -> WeightsProvenance | None:
    """Where the encoder's starting weights came from: the source registry's record (name,
    file, sha256, licence) when it loaded them, else the file's path and hash."""
    info = getattr(mae.encoder, "source_info", None)
    if info is None:
        return WeightsProvenance.of_file(weights)
    name = info.name if ":" in info.name else None  # a registered source, not a local file
    return WeightsProvenance(source=name, path=info.path, sha256=info.sha256, licence=info.licence)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups from timm's ``param_groups_weight_decay``: no weight decay on biases, norms
    (1-D tensors) and the tokens the model lists in ``no_weight_decay()`` (``cls_token``,
    ``pos_embed``, ``mask_token``), ``weight_decay`` on the rest."""
    from timm.optim import param_groups_weight_decay

    listed = getattr(model, "no_weight_decay", None)
    names = listed() if callable(listed) else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=names)  # type: ignore[no-any-return]


def describe_strategy(name: str, strategy: MaskingStrategy) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return {"name": name, **(asdict(strategy) if is_dataclass(strategy) else {})}  # type: ignore[arg-type]


def export_encoder(mae: MaskedAutoencoder, path: Path) -> None:
    """Encoder weights in timm's key names as safetensors, written atomically."""
    from safetensors.torch import save

    state = {k: v.contiguous().cpu() for k, v in mae.encoder_state_dict().items()}
    with atomic_open(path, "wb") as handle:
        handle.write(save(state))


class PictureWriter:
    """Every ``every`` epochs (and after the last): a grid of training images, their entropy
    maps, the drawn masks and the reconstructions, as ``masks_epochNNN.png``."""

    def __init__(
        self,
        ds: Any,
        strategy: MaskingStrategy,
        patch: int,
        out: Path,
        every: int,
        epochs: int,
        seed: int,
        n: int = 6,
    ) -> None:
        """``ds``: the training images without augmentation (items ``{"image": [C, S, S]}``)."""
        self.out, self.every, self.epochs, self.seed, self.patch = out, every, epochs, seed, patch
        self.strategy = strategy
        size = len(ds)  # type: ignore[arg-type]
        picks = sorted(
            {round(i * (size - 1) / max(1, n - 1)) for i in range(min(n, size))}
        )  # spread over the split
        self.images = torch.stack([ds[i]["image"] for i in picks])

    def __call__(self, model: torch.nn.Module, epoch: int, record: dict[str, float]) -> None:
        last = epoch + 1 == self.epochs
        if dist_info()[0] != 0 or not (last or (self.every and (epoch + 1) % self.every == 0)):
            return
        device = next(model.parameters()).device
        x = self.images.to(device)
        masks = draw_masks(self.strategy, x, self.patch, [self.seed + i for i in range(len(x))])
        was_training = model.training
        model.eval()
        recon = model.reconstruct(x, masks)  # type: ignore[operator]
        model.train(was_training)
        entropy = patch_entropy(x, self.patch, getattr(self.strategy, "bins", 32))
        save_grid(
            x.cpu(),
            entropy.cpu(),
            masks.cpu(),
            recon.cpu(),
            self.out / f"masks_epoch{epoch + 1:03d}.png",
            f"epoch {epoch + 1}: loss {record.get('train_loss', math.nan):.4f}",
        )


def save_grid(
    x: torch.Tensor,
    entropy: torch.Tensor,
    masks: torch.Tensor,
    recon: torch.Tensor,
    path: Path,
    title: str,
) -> None:
    """Rows: images, entropy maps, masked inputs, reconstructions; one column per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    fig, axes = plt.subplots(4, n, figsize=(1.8 * n, 7.4), squeeze=False)
    up = torch.nn.functional.interpolate(masks[:, None].float(), size=x.shape[-2:], mode="nearest")[
        :, 0
    ]
    rows = [
        ("image", x),
        ("entropy", entropy),
        ("masked input", x * (1 - up[:, None])),
        ("reconstruction", recon),
    ]
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c]
            if img.ndim == 3:
                img = img.permute(1, 2, 0).squeeze(-1).clamp(0, 1)
            ax.imshow(
                img.numpy(),
                cmap="magma" if label == "entropy" else "gray",
                vmin=0,
                vmax=float(entropy.max()) if label == "entropy" else 1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)


def plot_loss(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(
        [h["epoch"] for h in history],
        [h["train_loss"] for h in history],
        marker="." if len(history) < 30 else None,
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked-patch loss (train)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


__all__ = ["ENCODER_FILE", "EntropyMasking", "PretrainConfig", "PretrainResult", "pretrain"]
