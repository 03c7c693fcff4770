"""EchoFM hyper-parameters as one dataclass, with the paper's presets and checked overrides."""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

MASK_TYPES = ("random", "uniform", "consistent")
CONTRASTIVE_TYPES = ("triplet", "pixel", "none")


@dataclass(frozen=True)
class EchoFMConfig:
    """Shape of the video ViT, its MAE decoder, the periodic projector and the losses."""

    img_size: int = 224
    num_frames: int = 32
    tubelet: int = 4              # frames per token (t)
    patch_size: int = 16          # pixels per token side (p)
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    pred_t_dim: Optional[int] = None  # target frames for reconstruction; None = one per tubelet
    norm_pix_loss: bool = False
    mask_type: str = "consistent"     # masking used for the reconstruction/contrastive pass
    mask_ratio: float = 0.75
    contrastive: str = "triplet"      # paper's triplet loss | "pixel" prior variant | "none"
    contrastive_weight: float = 1.0
    triplet_margin: float = 0.2       # on L2-normalised embeddings (triplet) / cosine (pixel)
    kl_weight: float = 1.0            # pixel variant only: KL(prior || embedding) per row
    kl_temperature: float = 0.1
    drop_path: float = 0.0

    def __post_init__(self):
        if self.num_frames % self.tubelet:
            raise ValueError(
                f"num_frames={self.num_frames} is not divisible by tubelet={self.tubelet}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError("embed_dim / decoder_embed_dim must be divisible by their head counts")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        if self.contrastive not in CONTRASTIVE_TYPES:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE_TYPES}, got {self.contrastive!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        pred = self.pred_frames
        if (self.tubelet * pred) % self.num_frames or pred > self.num_frames:
            raise ValueError(
                f"pred_t_dim={pred} must be a multiple of num_frames/tubelet={self.t_grid}"
            )

    @property
    def t_grid(self) -> int:
        return self.num_frames // self.tubelet

    @property
    def s_grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_spatial(self) -> int:
        return self.s_grid**2

    @property
    def num_tokens(self) -> int:
        return self.t_grid * self.num_spatial

    @property
    def pred_frames(self) -> int:
        return self.pred_t_dim or self.t_grid

    @property
    def pred_tubelet(self) -> int:
        """Target frames predicted per token (1 in the paper setting)."""
        return self.tubelet * self.pred_frames // self.num_frames

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EchoFMConfig":
        return cls().with_overrides(**d)

    def with_overrides(self, **overrides) -> "EchoFMConfig":
        """A copy with ``overrides``; an unknown key raises and names the closest valid one."""
        names = [f.name for f in fields(self)]
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise KeyError(f"unknown EchoFM config key {key!r}{hint}")
        return replace(self, **overrides)


_PAPER_VIDEO = dict(img_size=224, num_frames=32, tubelet=4, patch_size=16)
_PAPER_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRESETS = {
    # Small enough for unit tests and the CPU demo.
    "tiny": dict(img_size=64, num_frames=16, tubelet=4, patch_size=8, embed_dim=96, depth=4,
                 num_heads=3, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2),
    "vit_s": dict(**_PAPER_VIDEO, **_PAPER_DECODER, embed_dim=384, depth=12, num_heads=6),
    "vit_b": dict(**_PAPER_VIDEO, **_PAPER_DECODER, embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(**_PAPER_VIDEO, **_PAPER_DECODER, embed_dim=1024, depth=24, num_heads=16),
}


def make_config(preset_or_config: Union[str, dict, EchoFMConfig] = "vit_l", **overrides) -> EchoFMConfig:
    """Resolve a preset name, a dict or a config into an :class:`EchoFMConfig` with overrides."""
    if isinstance(preset_or_config, EchoFMConfig):
        return preset_or_config.with_overrides(**overrides)
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise KeyError(f"unknown EchoFM preset {preset_or_config!r}; choose from {sorted(PRESETS)}")
        return EchoFMConfig().with_overrides(**{**PRESETS[preset_or_config], **overrides})
    if isinstance(preset_or_config, dict):
        base = dict(preset_or_config)
        preset = base.pop("preset", None)
        start = make_config(preset) if preset else EchoFMConfig()
        return start.with_overrides(**{**base, **overrides})
    raise TypeError(f"expected a preset name, dict or EchoFMConfig, got {type(preset_or_config).__name__}")
