"""Checkpoint reading and key maps for the KL autoencoders in :mod:`dream.models.autoencoder`.

Two on-disk layouts describe the same network:

* **diffusers** (``encoder.down_blocks.{i}.resnets.{b}``, ``mid_block``, ``decoder.up_blocks.{j}``, linear
  attention ``to_q/to_k/to_v/to_out.0``). This is the layout :class:`dream.models.autoencoder.AutoencoderKL` uses
  internally, so its ``state_dict()`` is a diffusers-format VAE state dict.
* **LDM / CompVis / MAR** (``encoder.down.{i}.block.{b}``, ``mid.block_1``, ``decoder.up.{i}``, 1x1-conv
  attention ``q/k/v/proj_out``, ``nin_shortcut``), used by Stable Diffusion ``.ckpt`` files (under the
  ``first_stage_model.`` prefix) and MAR's ``kl16.ckpt`` (under ``model``).

The map is the one documented in ``mar_diffusion_spec.md`` §4 (re-implemented from that table; no code from
diffusers' converter or LDM is reproduced). Level numbering: LDM ``decoder.up.{i}`` counts from the highest
resolution (``i = 0``), diffusers ``decoder.up_blocks.{j}`` from the lowest, so ``j = L - 1 - i`` with ``L``
the number of resolution levels. Attention kernels are ``[C, C, 1, 1]`` convolutions in LDM files and
``[C, C]`` linear weights here.

Also handled: deprecated diffusers attention names (``query/key/value/proj_attn``), ``module.`` /
``_orig_mod.`` prefixes, and wrapper dicts (``state_dict`` / ``model`` / ``ema``).

Ignored keys (documented behaviour, reported by :func:`clean_vae_state_dict`):

* ``loss.*``: the LPIPS / discriminator weights that LDM autoencoder training checkpoints carry.
* in a full Stable Diffusion checkpoint (any key starting with ``first_stage_model.``), every key *without*
  that prefix (UNet ``model.*``, text encoder ``cond_stage_model.*``, EMA buffers, ...).

Every other key must match the model exactly; the loader in :mod:`dream.models.autoencoder` is strict.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import torch

__all__ = [
    "read_checkpoint",
    "read_json",
    "resolve_vae_files",
    "to_diffusers_layout",
    "compare_state_dicts",
    "diffusers_config_to_kwargs",
    "kwargs_to_diffusers_config",
    "ldm_config_to_kwargs",
    "unwrap_state_dict",
    "clean_vae_state_dict",
    "detect_layout",
    "ldm_to_diffusers",
    "diffusers_to_ldm",
    "rename_deprecated_attention",
    "infer_vae_architecture",
]

# --------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SD_VAE_PREFIX = "first_stage_model."


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat tensor dict from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

    Args:
        path: file path. ``.safetensors`` is read with safetensors; anything else (``.ckpt``, ``.pth``,
            ``.pt``, ``.bin``) with ``torch.load(map_location="cpu", weights_only=True)`` and unwrapped with
            :func:`unwrap_state_dict`.

    Returns:
        ``{name: tensor}`` on CPU.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read safely or holds no tensor dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE checkpoint file not found: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with non-allow-listed globals, corrupt file, ...
        raise ValueError(
            f"could not read {path!r} with torch.load(weights_only=True): {err}. The file probably pickles "
            "Python objects besides tensors (e.g. a training-framework checkpoint). Re-save just its state "
            "dict (torch.save(ckpt['state_dict'], ...) in a trusted environment) or convert it to safetensors."
        ) from err
    return unwrap_state_dict(obj, source=path)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")


def resolve_vae_files(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str, bool]:
    """Locate ``(config.json contents or None, weights file, config_required)`` for a VAE path.

    A folder must hold ``config.json`` and one of :data:`WEIGHT_NAMES` (a diffusers pipeline folder is
    followed into its ``vae/`` subfolder). For a ``.safetensors`` file a ``config.json`` next to it is
    returned when present (``config_required`` False: it may belong to something else).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
            path = os.path.join(path, "vae")  # diffusers pipeline folder
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in VAE folder {path!r}")
        for name in WEIGHT_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return read_json(cfg_path), os.path.join(path, name), True
        raise FileNotFoundError(f"no weights in {path!r}: expected one of {list(WEIGHT_NAMES)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE weights not found: {path!r}")
    side = os.path.join(os.path.dirname(path), "config.json")
    if path.endswith(".safetensors") and os.path.isfile(side):
        return read_json(side), path, False
    return None, path, False


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` dict inside a checkpoint object.

    Accepts a flat dict or one nested under ``state_dict`` / ``model`` / ``model_state_dict`` / ``module``
    (searched in that order, recursively). Non-tensor entries of the chosen dict raise.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return unwrap_state_dict(obj[key], source=f"{source}[{key!r}]")
    names = sorted(str(k) for k in obj.keys())[:10]
    raise ValueError(
        f"{source}: no tensor state dict found; top-level keys are {names} (expected tensors or one of "
        f"{list(_WRAPPER_KEYS)})"
    )


def clean_vae_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes and drop the keys the VAE loader documents as ignorable.

    Returns:
        ``(cleaned, ignored)``: the cleaned dict and the sorted list of original key names that were dropped
        (``loss.*``; non-``first_stage_model.`` keys of a full Stable Diffusion checkpoint).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for p in _STRIP_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    ignored: list[str] = []
    if any(k.startswith(_SD_VAE_PREFIX) for k in out):
        ignored += [k for k in out if not k.startswith(_SD_VAE_PREFIX)]
        out = {k[len(_SD_VAE_PREFIX):]: v for k, v in out.items() if k.startswith(_SD_VAE_PREFIX)}
    ignored += [k for k in out if k.startswith("loss.")]
    out = {k: v for k, v in out.items() if not k.startswith("loss.")}
    return out, sorted(ignored)


# --------------------------------------------------------------------------------------------------------
# Layout detection and renaming
# --------------------------------------------------------------------------------------------------------

_LDM_PATTERN = re.compile(r"^(encoder|decoder)\.(down|up|mid|norm_out)\.")
_DIFFUSERS_PATTERN = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """Return ``"ldm"``, ``"diffusers"`` or ``"unknown"`` from the key names (raises on a mixture)."""
    has_ldm = any(_LDM_PATTERN.match(k) for k in sd)
    has_diffusers = any(_DIFFUSERS_PATTERN.match(k) for k in sd)
    if has_ldm and has_diffusers:
        ldm = sorted(k for k in sd if _LDM_PATTERN.match(k))[:3]
        dif = sorted(k for k in sd if _DIFFUSERS_PATTERN.match(k))[:3]
        raise ValueError(f"state dict mixes LDM keys (e.g. {ldm}) and diffusers keys (e.g. {dif})")
    return "ldm" if has_ldm else "diffusers" if has_diffusers else "unknown"


def _num_levels(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


# attention parameter names: LDM -> diffusers (current) ; deprecated diffusers -> current
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_DIFFUSERS_ATTN_TO_LDM = {v: k for k, v in _LDM_ATTN.items()}
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")


def _ldm_attn_to_diffusers(rest: str) -> str:
    name, _, param = rest.rpartition(".")
    return f"{_LDM_ATTN.get(name, name)}.{param}"


def _ldm_key_to_diffusers(key: str, levels: int) -> str:
    """Rename one LDM key (unknown keys pass through unchanged so the strict loader reports them)."""
    if m := re.match(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$", key):
        rest = m.group(3).replace("nin_shortcut", "conv_shortcut")
        return f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{rest}"
    if m := re.match(r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(.+)$", key):
        return f"encoder.down_blocks.{m.group(1)}.attentions.{m.group(2)}.{_ldm_attn_to_diffusers(m.group(3))}"
    if m := re.match(r"^encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$", key):
        rest = m.group(3).replace("nin_shortcut", "conv_shortcut")
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.{rest}"
    if m := re.match(r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(.+)$", key):
        j = levels - 1 - int(m.group(1))
        return f"decoder.up_blocks.{j}.attentions.{m.group(2)}.{_ldm_attn_to_diffusers(m.group(3))}"
    if m := re.match(r"^decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key):
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    if m := re.match(r"^(encoder|decoder)\.mid\.block_([12])\.(.+)$", key):
        rest = m.group(3).replace("nin_shortcut", "conv_shortcut")
        return f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{rest}"
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(.+)$", key):
        return f"{m.group(1)}.mid_block.attentions.0.{_ldm_attn_to_diffusers(m.group(2))}"
    if m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    return key


def _diffusers_key_to_ldm(key: str, levels: int) -> str:
    """Inverse of :func:`_ldm_key_to_diffusers`."""

    def attn(rest: str) -> str:
        name, _, param = rest.rpartition(".")
        return f"{_DIFFUSERS_ATTN_TO_LDM.get(name, name)}.{param}"

    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
        return f"encoder.down.{m.group(1)}.block.{m.group(2)}.{rest}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", key):
        return f"encoder.down.{m.group(1)}.attn.{m.group(2)}.{attn(m.group(3))}"
    if m := re.match(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
        return f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
        rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
        return f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{rest}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", key):
        return f"decoder.up.{levels - 1 - int(m.group(1))}.attn.{m.group(2)}.{attn(m.group(3))}"
    if m := re.match(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
        return f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)$", key):
        rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{rest}"
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
        return f"{m.group(1)}.mid.attn_1.{attn(m.group(2))}"
    if m := re.match(r"^(encoder|decoder)\.conv_norm_out\.(.+)$", key):
        return f"{m.group(1)}.norm_out.{m.group(2)}"
    return key


def _is_attention_linear_weight(key: str) -> bool:
    return ".attentions." in key and key.endswith(".weight") and any(f".{n}.weight" in key for n in _ATTN_LINEARS)


def ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an LDM/CompVis/MAR-layout VAE state dict to the diffusers layout used by ``AutoencoderKL``.

    The number of resolution levels is read from the ``encoder.down.{i}`` / ``decoder.up.{i}`` indices.
    1x1-conv attention kernels ``[C, C, 1, 1]`` become linear weights ``[C, C]``.
    """
    levels = max(_num_levels(sd, r"^decoder\.up\.(\d+)\."), _num_levels(sd, r"^encoder\.down\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        new = _ldm_key_to_diffusers(k, levels)
        if _is_attention_linear_weight(new) and v.dim() == 4:
            v = v.reshape(v.shape[0], v.shape[1]) if v.shape[2:] == (1, 1) else v
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} (second: {k!r})")
        out[new] = v
    return out


def diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers-layout VAE state dict to the LDM/CompVis/MAR layout (inverse of
    :func:`ldm_to_diffusers`; linear attention weights become ``[C, C, 1, 1]`` conv kernels)."""
    levels = max(_num_levels(sd, r"^decoder\.up_blocks\.(\d+)\."), _num_levels(sd, r"^encoder\.down_blocks\.(\d+)\."))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _is_attention_linear_weight(k) and v.dim() == 2:
            v = v.reshape(*v.shape, 1, 1)
        out[_diffusers_key_to_ldm(k, levels)] = v
    return out


def rename_deprecated_attention(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map old diffusers attention names (``query/key/value/proj_attn``) to ``to_q/to_k/to_v/to_out.0`` and
    squeeze ``[C, C, 1, 1]`` attention kernels to ``[C, C]`` (some converted files keep conv shapes)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if m := re.match(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$", k):
            k = f"{m.group(1)}.{_DEPRECATED_ATTN[m.group(2)]}.{m.group(3)}"
        if _is_attention_linear_weight(k) and v.dim() == 4 and v.shape[2:] == (1, 1):
            v = v.reshape(v.shape[0], v.shape[1])
        if k in out:
            raise ValueError(f"state dict holds both the deprecated and the current name of {k!r}")
        out[k] = v
    return out


def to_diffusers_layout(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Clean prefixes (:func:`clean_vae_state_dict`), convert LDM keys and deprecated attention names.

    Returns:
        ``(state_dict in the diffusers layout, ignored key names)``.
    """
    sd, ignored = clean_vae_state_dict(sd)
    if detect_layout(sd) == "ldm":
        sd = ldm_to_diffusers(sd)
    return rename_deprecated_attention(sd), ignored


def compare_state_dicts(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]
                        ) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mis-shaped)`` of ``sd`` against the model's ``own`` state dict (sorted;
    mis-shaped entries read ``"key: checkpoint (shape) vs model (shape)"``)."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    return missing, unexpected, shapes


# --------------------------------------------------------------------------------------------------------
# Config translation (plain dicts of VAEConfig fields)
# --------------------------------------------------------------------------------------------------------

_DOWN_TYPES = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
_UP_TYPES = {"UpDecoderBlock2D", "AttnUpDecoderBlock2D"}


def kwargs_to_diffusers_config(kw: Mapping[str, Any]) -> dict[str, Any]:
    """``VAEConfig.to_dict()`` -> diffusers ``AutoencoderKL`` ``config.json`` (plus ``dream_patch_size``)."""
    n = len(kw["block_out_channels"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in kw["encoder_attn_levels"] else "DownEncoderBlock2D"
                             for i in range(n)],
        "up_block_types": ["AttnUpDecoderBlock2D" if n - 1 - j in kw["decoder_attn_levels"] else "UpDecoderBlock2D"
                           for j in range(n)],
        "block_out_channels": list(kw["block_out_channels"]),
        "layers_per_block": kw["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": kw["latent_channels"],
        "norm_num_groups": kw["norm_num_groups"],
        "sample_size": kw["sample_size"],
        "scaling_factor": kw["scaling_factor"],
        "shift_factor": kw["shift_factor"],
        "use_quant_conv": kw["use_quant_conv"],
        "use_post_quant_conv": kw["use_post_quant_conv"],
        "mid_block_add_attention": kw["mid_block_attention"],
        "dream_patch_size": kw["patch_size"],
    }


def diffusers_config_to_kwargs(d: Mapping[str, Any], patch_size: int | None = None) -> dict[str, Any]:
    """Diffusers ``AutoencoderKL`` ``config.json`` -> ``VAEConfig`` keyword arguments (see
    ``VAEConfig.from_diffusers_config`` for the ``patch_size`` default)."""
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"only act_fn='silu' is supported, config has {d['act_fn']!r}")
    if d.get("latents_mean") is not None or d.get("latents_std") is not None:
        raise ValueError("per-channel latents_mean/latents_std are not supported by VAEConfig")
    down = list(d.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(d.get("up_block_types", ["UpDecoderBlock2D"]))
    bad = sorted((set(down) - _DOWN_TYPES) | (set(up) - _UP_TYPES))
    if bad:
        raise ValueError(f"unsupported block types {bad}")
    block_out = tuple(d.get("block_out_channels", (64,)))
    n = len(block_out)
    if len(down) != n or len(up) != n:
        raise ValueError(f"{len(down)} down / {len(up)} up block types for {n} block_out_channels")
    if patch_size is None:
        patch_size = d.get("dream_patch_size") or max(1, 16 // 2 ** (n - 1))
    return dict(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        block_out_channels=block_out,
        layers_per_block=d.get("layers_per_block", 1),
        norm_num_groups=d.get("norm_num_groups", 32),
        encoder_attn_levels=tuple(i for i, t in enumerate(down) if t.startswith("Attn")),
        decoder_attn_levels=tuple(sorted(n - 1 - j for j, t in enumerate(up) if t.startswith("Attn"))),
        mid_block_attention=d.get("mid_block_add_attention", True),
        use_quant_conv=d.get("use_quant_conv", True),
        use_post_quant_conv=d.get("use_post_quant_conv", True),
        scaling_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
        patch_size=patch_size,
        sample_size=d.get("sample_size", 256),
    )


def ldm_config_to_kwargs(ddconfig: Mapping[str, Any], embed_dim: int) -> dict[str, Any]:
    """LDM ``ddconfig`` + ``embed_dim`` -> ``VAEConfig`` architecture keyword arguments; ``attn_resolutions``
    (feature-map sizes at input ``resolution``) become levels ``i`` with ``resolution / 2**i`` listed."""
    ch, mult = int(ddconfig["ch"]), tuple(ddconfig["ch_mult"])
    if ddconfig.get("z_channels", embed_dim) != embed_dim:
        raise ValueError("z_channels != embed_dim is not supported (quant convs would change the width)")
    res = int(ddconfig.get("resolution", 256))
    attn = set(ddconfig.get("attn_resolutions", ()))
    levels = tuple(i for i in range(len(mult)) if res // 2 ** i in attn)
    return dict(in_channels=ddconfig.get("in_channels", 3), out_channels=ddconfig.get("out_ch", 3),
                latent_channels=embed_dim, block_out_channels=tuple(ch * m for m in mult),
                layers_per_block=int(ddconfig["num_res_blocks"]), encoder_attn_levels=levels,
                decoder_attn_levels=levels, sample_size=res)


# --------------------------------------------------------------------------------------------------------
# Architecture inference (diffusers layout)
# --------------------------------------------------------------------------------------------------------


def infer_vae_architecture(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture fields of a VAE config from a diffusers-layout state dict.

    Returns a dict with ``in_channels``, ``out_channels``, ``latent_channels``, ``block_out_channels``,
    ``layers_per_block``, ``encoder_attn_levels``, ``decoder_attn_levels``, ``mid_block_attention``,
    ``use_quant_conv``, ``use_post_quant_conv``. GroupNorm group counts are not stored in weights and are
    not inferred.

    Raises:
        ValueError: a key needed for the inference is missing (names the key).
    """

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"cannot infer the VAE architecture: key {key!r} is missing")
        return sd[key]

    levels = _num_levels(sd, r"^encoder\.down_blocks\.(\d+)\.")
    if levels == 0:
        raise ValueError("cannot infer the VAE architecture: no 'encoder.down_blocks.*' keys")
    block_out = tuple(int(need(f"encoder.down_blocks.{i}.resnets.0.conv1.weight").shape[0]) for i in range(levels))
    layers = _num_levels(sd, r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    def has_attn(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    enc_attn = tuple(i for i in range(levels) if has_attn(f"encoder.down_blocks.{i}.attentions."))
    dec_attn = tuple(sorted(levels - 1 - j for j in range(levels) if has_attn(f"decoder.up_blocks.{j}.attentions.")))
    return {
        "in_channels": int(need("encoder.conv_in.weight").shape[1]),
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "latent_channels": int(need("decoder.conv_in.weight").shape[1]),
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "encoder_attn_levels": enc_attn,
        "decoder_attn_levels": dec_attn,
        "mid_block_attention": any(k.startswith("encoder.mid_block.attentions.") for k in sd),
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
    }
