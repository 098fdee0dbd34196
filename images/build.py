#!/usr/bin/env python3
"""`make images`: the operator, trainer and inference images, built with buildah from the very
Dockerfiles users build with `docker build`.

No container registry is reachable here, so the Python base is made from Debian's packages with
mmdebstrap (the machine's own apt sources, read in place) and imported as a local image; the
Dockerfiles take it as their PYTHON_IMAGE build argument, whose default stays the public image.
The machine's CA bundle and package indexes reach the build as a read-only mount and build
arguments, never as a file in an image. The machine's uv cache is mounted into the dependency
step, so torch is not downloaded a second time.

Builds are cached by content: the base by its package list, every Dockerfile step by buildah's
layer cache (COPY steps by the digest of what they copy), so an unchanged tree rebuilds nothing
and a code change rebuilds only the small layer holding the project's wheel.

Each image is tagged `dreambooth/<name>:<version>` (what the chart defaults to) and
`dreambooth/<name>:<version>-<image id>` (unique: test beds of several checkouts on one machine
never run each other's code). build/images.json records both; the test bed reads it.

Usage: python3 images/build.py [NAME ...]      (default: operator trainer inference)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
RECORD = REPO / "build" / "images.json"
NAMES = ("operator", "trainer", "inference")
# What the base holds besides Debian's minbase: python3 like the public slim image, venv's
# ensurepip (the tools stage makes a venv), CA certificates for https clients, useradd.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
BASE_RECIPE = 2  # bump when the way the base is made changes
# As slim images do: no manuals, translations or docs, but every package's copyright file.
BASE_DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/info/*",
                     "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright")
DEBIAN_TOOLS = {"buildah": "buildah", "mmdebstrap": "mmdebstrap", "runc": "runc"}
# Where the build sees the machine's CA bundle and uv cache, mounted for RUN steps only. Both
# paths exist in the base, so no mount point is left behind in a layer.
CA_IN_BUILD = "/etc/ssl/certs/ca-certificates.crt"
UV_CACHE_IN_BUILD = "/mnt"
APT_FOLDERS = ("/etc/apt/sources.list.d", "/etc/apt/apt.conf.d")


def say(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload]


def buildah(*args: str, capture: bool = True) -> str:
    result = subprocess.run(["buildah", *args], text=True, capture_output=capture)
    if result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed: {(result.stderr or '').strip()[-2000:]}")
    return (result.stdout or "").strip()


def image_id(ref: str) -> str | None:
    result = subprocess.run(["buildah", "inspect", "--type", "image", "--format", "{{.FromImageID}}", ref],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def image_size_bytes(ref: str) -> int:
    """The size containers/storage reports (decimal units, as `buildah images` prints it)."""
    listing = json.loads(buildah("images", "--json", ref))
    number, unit = re.fullmatch(r"([\d.]+)\s*([kMGT]?B)", listing[0]["size"]).groups()
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit])


# --------------------------------------------------------------------------------------------
def ensure_debian_tools() -> None:
    """buildah, mmdebstrap and runc from Debian's packages (a no-op when present)."""
    missing = [package for tool, package in DEBIAN_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    say(f"installing {' '.join(missing)} (Debian packages)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def debian_suite() -> str:
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    return release.get("VERSION_CODENAME", "").strip('"') or "bookworm"


def apt_source_files(suite: str) -> list[str]:
    """The machine's enabled apt source files that serve `suite` (passed to mmdebstrap as they are)."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
                  *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found = []
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        suites = set(re.findall(r"^Suites:\s*(.+)$", text, re.M))
        words = {w for line in suites for w in line.split()}
        words |= {m.group(1) for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?\S+\s+(\S+)", text, re.M)}
        if words & wanted:
            found.append(str(path))
    if not found:
        raise RuntimeError(f"no apt source for Debian {suite} in /etc/apt: the base is made from Debian's packages")
    return found


def apt_validity_options() -> list[str]:
    """The machine's own Acquire::Check-* settings (a snapshot mirror's Release files may be past their date)."""
    dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True).stdout
    return [f"--aptopt={line}" for line in dump.splitlines() if re.match(r"Acquire::Check-(Valid-Until|Date) ", line)]


def base_ref(suite: str) -> str:
    key = hashlib.sha256(json.dumps([suite, BASE_PACKAGES, BASE_DPKG_OPTIONS, BASE_RECIPE]).encode()).hexdigest()[:12]
    return f"dreambooth-base/python:{suite}-{key}"


def ensure_base() -> str:
    """A Python base from Debian's packages (like the public slim image), made once per package list."""
    suite = debian_suite()
    ref = base_ref(suite)
    if image_id(ref):
        return ref
    say(f"making the Python base {ref} from Debian {suite} packages (mmdebstrap)")
    start = time.monotonic()
    # The image keeps no apt source and no option of this machine: both are removed after the build.
    forget_machine = ('rm -f "$1"/etc/apt/sources.list "$1"/etc/apt/apt.conf.d/99mmdebstrap; '
                      'rm -rf "$1"/etc/apt/sources.list.d/*')
    with tempfile.TemporaryDirectory(prefix="dreambooth-base-") as tmp:
        tarball = Path(tmp) / "base.tar"
        run(["nice", "-n", "10", "mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             *[f"--dpkgopt={option}" for option in BASE_DPKG_OPTIONS], *apt_validity_options(),
             f"--customize-hook={forget_machine}", suite, str(tarball), *apt_source_files(suite)])
        container = buildah("from", "scratch")
        try:
            buildah("add", container, str(tarball), "/")
            buildah("config", "--env", "LANG=C.UTF-8", "--cmd", "python3",
                    "--label", f"org.opencontainers.image.description=Debian {suite} minbase with python3 (mmdebstrap)",
                    container)
            buildah("commit", "--quiet", container, ref)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
    say(f"base ready in {time.monotonic() - start:.0f} s")
    return ref


# --------------------------------------------------------------------------------------------
def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def git_output(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def ca_bundle() -> str | None:
    for candidate in (os.environ.get("SSL_CERT_FILE"), os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def uv_cache_dir() -> Path | None:
    uv = REPO / ".venv" / "bin" / "uv"
    if uv.exists():
        found = subprocess.run([str(uv), "cache", "dir"], capture_output=True, text=True).stdout.strip()
        if found and Path(found).is_dir():
            return Path(found)
    default = Path(os.environ.get("UV_CACHE_DIR") or Path.home() / ".cache" / "uv")
    return default if default.is_dir() else None


def machine_build_options() -> list[str]:
    """CA bundle, package indexes and uv cache of this machine: mounts and build args, never files."""
    # apt in a RUN step reads the machine's own sources and options (the base keeps none).
    options: list[str] = [arg for folder in APT_FOLDERS if Path(folder).is_dir() for arg in ("-v", f"{folder}:{folder}:ro")]
    ca = ca_bundle()
    if ca:
        options += ["-v", f"{ca}:{CA_IN_BUILD}:ro", "--build-arg", f"PIP_CERT={CA_IN_BUILD}",
                    "--build-arg", f"SSL_CERT_FILE={CA_IN_BUILD}"]
    if os.environ.get("PIP_INDEX_URL"):
        options += ["--build-arg", "PIP_INDEX_URL"]  # no value: buildah reads it from the environment
    if os.environ.get("UV_DEFAULT_INDEX"):
        options += ["--build-arg", "UV_DEFAULT_INDEX"]
    cache = uv_cache_dir()
    if cache:
        options += ["-v", f"{cache}:{UV_CACHE_IN_BUILD}", "--build-arg", f"UV_CACHE_DIR={UV_CACHE_IN_BUILD}"]
    return options


@dataclass
class Built:
    name: str
    ref: str        # unique: dreambooth/<name>:<version>-<id>
    version_ref: str  # dreambooth/<name>:<version>, the chart's default
    id: str
    size_bytes: int
    seconds: float


def release_labels(build_args: dict[str, str]) -> list[str]:
    """The labels that change with the commit, given on the command line: buildah's layer cache keeps a
    LABEL step whose ARG values changed (1.28 reuses the last build's revision), `--label` is applied on
    every build. The Dockerfiles' own LABELs stay for a plain `docker build`."""
    return [f"org.opencontainers.image.version={build_args['VERSION']}",
            f"org.opencontainers.image.revision={build_args['REVISION']}",
            f"org.opencontainers.image.source={build_args['SOURCE']}"]


def build_image(name: str, build_args: dict[str, str], machine: list[str]) -> Built:
    version = build_args["VERSION"]
    version_ref = f"dreambooth/{name}:{version}"
    argv = ["buildah", "bud", "--layers", "--force-rm", "--isolation", "chroot", "--network", "host", "--quiet",
            "-f", str(IMAGES / f"{name}.Dockerfile"), *machine]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    argv += [arg for label in release_labels(build_args) for arg in ("--label", label)]
    argv += ["-t", version_ref, str(REPO)]
    start = time.monotonic()
    say(f"building {name} ({IMAGES.name}/{name}.Dockerfile)")
    with open(REPO / "build" / f"image-{name}.log", "w") as log:
        result = subprocess.run(["nice", "-n", "10", *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = (REPO / "build" / f"image-{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"building the {name} image failed:\n{tail}")
    found = image_id(version_ref)
    assert found, f"{version_ref} missing after its build"
    ref = f"{version_ref}-{found[:12]}"
    buildah("tag", version_ref, ref)
    return Built(name, ref, version_ref, found, image_size_bytes(ref), time.monotonic() - start)


def forget_previous(previous: dict, current: dict[str, Built]) -> None:
    """Untag what this checkout built before and no longer uses (other checkouts' tags stay)."""
    for name, entry in previous.get("images", {}).items():
        old = entry.get("ref")
        if old and name in current and current[name].ref != old:
            subprocess.run(["buildah", "rmi", old], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
    parser.add_argument("--record", type=Path, default=RECORD)
    args = parser.parse_args()
    unknown = set(args.names) - set(NAMES)
    if unknown:
        parser.error(f"no image named {', '.join(sorted(unknown))} (images: {', '.join(NAMES)})")
    # The inference image is built on the trainer image.
    names = [n for n in NAMES if n in (args.names or NAMES) or (n == "trainer" and "inference" in args.names)]
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with open(args.record.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per checkout at a time
        start = time.monotonic()
        ensure_debian_tools()
        base = ensure_base()
        build_args = {"PYTHON_IMAGE": base, "VERSION": project_version(),
                      "REVISION": git_output("rev-parse", "HEAD") or "unknown",
                      "SOURCE": git_output("remote", "get-url", "origin") or "unknown"}
        machine = machine_build_options()
        built: dict[str, Built] = {}
        for name in names:
            extra = {"TRAINER_IMAGE": built["trainer"].ref} if name == "inference" else {}
            built[name] = build_image(name, {**build_args, **extra}, machine)
        previous = json.loads(args.record.read_text()) if args.record.exists() else {}
        merged = {**previous.get("images", {}), **{n: asdict(b) for n, b in built.items()}}
        forget_previous(previous, built)
        args.record.write_text(json.dumps({"base": base, "images": merged}, indent=2) + "\n")
    print(f"{'image':<52} {'size':>9} {'build':>8}")
    for b in built.values():
        print(f"{b.ref:<52} {b.size_bytes / 1e9:>7.2f}GB {b.seconds:>7.1f}s")
    print(f"images ready in {time.monotonic() - start:.1f} s (record: {args.record.relative_to(REPO)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
