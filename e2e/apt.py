"""A private apt configuration derived from this machine's own apt sources.

The cluster's binaries come from Debian packages (source and binary) that are not
installed: we only download and unpack them. To get source packages we need `deb-src`
entries the machine may not have, so we copy its enabled sources into a directory of our
own, add `deb-src`, and point apt at that copy with `-o Dir::Etc::...` options. /etc/apt is
never edited, and no registry host name is written into the repository: the hosts are
whatever this machine's apt already uses.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

log = logging.getLogger("shoal.e2e")

ETC_APT = Path("/etc/apt")


def add_deb_src_deb822(text: str) -> str:
    """Add deb-src to every stanza of a deb822 .sources file (`Types: deb` -> `deb deb-src`)."""

    def widen(match: re.Match[str]) -> str:
        types = match.group(2).split()
        if "deb" in types and "deb-src" not in types:
            types.append("deb-src")
        return f"{match.group(1)}{' '.join(types)}"

    return re.sub(r"(?im)^(Types:[ \t]*)(.*)$", widen, text)


def add_deb_src_one_line(text: str) -> str:
    """For a one-line sources.list, add a `deb-src` twin after every `deb` line."""
    out: list[str] = []
    for line in text.splitlines():
        out.append(line)
        stripped = line.strip()
        if stripped.startswith("deb ") or stripped.startswith("deb\t"):
            out.append("deb-src" + stripped[3:])
    return "\n".join(out) + "\n"


def enabled_source_files(etc_apt: Path = ETC_APT) -> list[Path]:
    """The files apt itself reads: sources.list and sources.list.d/*.list|*.sources."""
    files = []
    main = etc_apt / "sources.list"
    if main.is_file():
        files.append(main)
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return files


class PrivateApt:
    """apt-get/apt-cache with sources and package lists under `root`, nothing global."""

    def __init__(self, root: Path, etc_apt: Path = ETC_APT) -> None:
        self.root = root
        self.parts = root / "sources.list.d"
        self.lists = root / "lists"
        self.etc_apt = etc_apt
        self._updated = False

    def options(self) -> list[str]:
        return [
            "-o",
            "Dir::Etc::SourceList=/dev/null",
            "-o",
            f"Dir::Etc::SourceParts={self.parts}",
            "-o",
            f"Dir::State::Lists={self.lists}",
            "-o",
            f"Dir::Cache={self.root / 'cache'}",
            "-o",
            "APT::Sandbox::User=root",  # downloads land in our own dirs, owned by us
        ]

    def _write_sources(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        (self.lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        for old in self.parts.iterdir():
            old.unlink()
        sources = enabled_source_files(self.etc_apt)
        if not sources:
            raise RuntimeError(f"no apt sources found under {self.etc_apt}")
        for i, src in enumerate(sources):
            text = src.read_text()
            if src.suffix == ".sources":
                (self.parts / f"{i:02d}-{src.stem}.sources").write_text(add_deb_src_deb822(text))
            else:
                (self.parts / f"{i:02d}-{src.stem}.list").write_text(add_deb_src_one_line(text))

    def update(self) -> None:
        if self._updated:
            return
        self._write_sources()
        log.info("refreshing the private apt package lists (%s)", self.lists)
        self.run("apt-get", "update", "-q")
        self._updated = True

    def run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        cmd = [tool, *self.options(), *args]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join([tool, *args])} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout

    def download(self, package: str, version: str, dest: Path) -> Path:
        """Download one binary .deb (apt checks it against the signed Release files)."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        self.run("apt-get", "download", "-q", f"{package}={version}", cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package}={version} left no .deb in {dest}")
        return debs[-1]

    def source(self, package: str, version: str, dest: Path) -> Path:
        """Download a source package (.dsc + tarballs); returns the .dsc path."""
        self.update()
        dest.mkdir(parents=True, exist_ok=True)
        self.run("apt-get", "source", "--download-only", "-q", f"{package}={version}", cwd=dest)
        dscs = sorted(dest.glob(f"{package}_*.dsc"))
        if not dscs:
            raise RuntimeError(f"apt-get source {package}={version} left no .dsc in {dest}")
        return dscs[-1]
