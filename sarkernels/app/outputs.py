"""Where the commands write, checked before any work: a folder we can write into, or a
picture file name we can write. Mistakes are ValueErrors naming the option."""
import os
import tempfile


def _probe(folder, what):
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise ValueError(f"{what}: cannot write there ({exc.strerror or exc})") from None


def folder(path, option="--out"):
    """Creates ``path`` if needed and checks that files can be written into it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a file; give a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{option} {path!r}: cannot create the folder "
                         f"({exc.strerror or exc})") from None
    _probe(path, f"{option} {path!r}")
    return path


def picture(path, option="--out"):
    """Checks that ``path`` names a picture file (by extension) in a writable folder."""
    from PIL import Image

    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r} is a folder; give a file name such as "
                         f"{os.path.join(path, 'samples.png')}")
    Image.init()
    if os.path.splitext(path)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"{option} {path!r} does not end in a picture extension such as .png")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path!r}: folder {parent!r} does not exist")
    _probe(parent, f"{option} {path!r}")
    return path
