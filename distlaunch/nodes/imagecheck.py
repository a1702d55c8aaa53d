"""Whether this machine can run a container image: the image is there for its runtime, and
an image directory holds the ranks' Python. Used before a launch here and by every node's
probe (``nodes.agent``); light, standard library only."""
from __future__ import annotations

import os
import subprocess


def image_problem(runtime: str, exe: str, image: str) -> str | None:
    """What is wrong with the image for this runtime on this machine, or None."""
    if runtime == "podman":
        proc = subprocess.run([exe, "image", "exists", image], capture_output=True, text=True)
        if proc.returncode != 0:
            return (f"podman has no image {image!r} here ('podman images' lists them): build or load it "
                    "(podman build, podman load)")
        return None
    if not os.path.exists(image):
        return f"image {image} does not exist: check the path (the same path on every node)"
    if runtime == "charliecloud" and os.path.isdir(image) and not os.path.isdir(os.path.join(image, "usr")):
        return f"image {image} is a directory but not an image (no usr/ in it): unpack the image there"
    return None


def python_in_image(image: str, python: str) -> bool:
    """Whether an image directory has ``python`` (a file image or a podman image cannot be
    looked into without starting it: assumed yes)."""
    if not os.path.isdir(image):
        return True
    return os.path.lexists(os.path.join(image, python.lstrip("/")))
