"""Serving requirements of the container images, read from pyproject.toml.

    python deploy/requirements.py cpu|gpu   # requirements file on stdout
    python deploy/requirements.py mediapipe # the mediapipe pin, installed with --no-deps

The base dependencies are the serving install, with two changes that keep the images
small (about 300 MB less):

- mediapipe is installed without its declared dependencies. Its wheel asks for jax,
  jaxlib, sounddevice and sentencepiece, which only its LLM-conversion and audio tasks
  import; the face-mesh and selfie-segmentation solutions the pose pipeline uses need
  only the packages in MEDIAPIPE_RUNTIME below (the image build imports them to check).
- OpenCV is the headless build: the same cv2 without the X11 and OpenGL libraries, so
  the image needs no extra Debian packages.

The GPU image swaps onnxruntime for onnxruntime-gpu (with the CUDA and cuDNN wheels it
loads), adds the `gpu` extra (TensorRT) and the onnx package, which the TensorRT engine
build uses to make the FP16 copy of the per-frame graph.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# what `mediapipe.solutions` imports at run time (numpy and protobuf are base dependencies)
MEDIAPIPE_RUNTIME = [
    "absl-py",
    "attrs",
    "flatbuffers",
    "matplotlib",
    "opencv-contrib-python-headless<4.12",  # 4.12 needs numpy 2; mediapipe needs numpy<2
]

# onnxruntime-gpu loads CUDA 12 and cuDNN 9 from these extras' wheels (no CUDA base image)
GPU_ORT = "onnxruntime-gpu[cuda,cudnn]"


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement line ('a_b[x]>=1' -> 'a-b')."""
    name = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def serving_requirements(target: str, pyproject: Path = PYPROJECT) -> list[str]:
    """Requirement lines of one image target ('cpu' or 'gpu')."""
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target: expected 'cpu' or 'gpu', got {target!r}")
    project = tomllib.loads(pyproject.read_text())["project"]

    # the serving install without mediapipe, whose wheel comes in separately
    lines = [r for r in project["dependencies"] if distribution(r) != "mediapipe"]
    lines += MEDIAPIPE_RUNTIME

    # GPU: the same ONNX Runtime versions, CUDA build; TensorRT from the gpu extra
    if target == "gpu":
        lines = [
            GPU_ORT + r.strip()[len("onnxruntime") :] if distribution(r) == "onnxruntime" else r
            for r in lines
        ]
        lines += project["optional-dependencies"]["gpu"]

        # the engine build converts the ONNX graph to FP16 with the onnx package
        if not any(distribution(r) == "onnx" for r in lines):
            extras = project["optional-dependencies"].values()
            lines += [r for extra in extras for r in extra if distribution(r) == "onnx"][:1]
    return lines


def mediapipe_pin(pyproject: Path = PYPROJECT) -> str:
    """The mediapipe requirement of the serving install."""
    project = tomllib.loads(pyproject.read_text())["project"]
    pins = [r for r in project["dependencies"] if distribution(r) == "mediapipe"]
    if len(pins) != 1:
        raise ValueError(f"pyproject: expected one mediapipe dependency, got {pins}")
    return pins[0]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("cpu", "gpu", "mediapipe"):
        sys.stderr.write("usage: deploy/requirements.py cpu|gpu|mediapipe\n")
        return 2
    if argv[0] == "mediapipe":
        sys.stdout.write(mediapipe_pin() + "\n")
    else:
        sys.stdout.write("\n".join(serving_requirements(argv[0])) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
