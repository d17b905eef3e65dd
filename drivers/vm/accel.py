"""Which accelerator a VM runs under: KVM where the CPU really virtualises, else TCG.

``/dev/kvm`` alone proves nothing: a machine that is itself a VM may offer a software nested
hypervisor there (``kvm-pvm``) that runs a stock kernel about 100 times slower than TCG. So KVM is
chosen only when the CPU advertises hardware virtualisation (``vmx`` or ``svm``) *and* ``/dev/kvm``
can be opened read-write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]

KVM = "/dev/kvm"
CPUINFO = "/proc/cpuinfo"


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def detect(setting: str = "", *, cpuinfo: str | None = None, kvm_usable: bool | None = None) -> tuple[Accel, str]:
    """Return ``(accel, reason)``: ``accel`` is ``"kvm"`` or ``"tcg"``, ``reason`` one line saying why.

    ``setting`` ``"kvm"`` or ``"tcg"`` forces that accelerator (``"kvm"`` raises ``ValueError`` when
    ``/dev/kvm`` cannot be opened read-write); ``""`` or ``"auto"`` detects. ``cpuinfo`` (the text of
    /proc/cpuinfo) and ``kvm_usable`` (whether /dev/kvm is read/writable) default to this machine's;
    tests pass them to stay pure.
    """
    choice = setting.strip().lower()
    if choice not in ("", "auto", "kvm", "tcg"):
        raise ValueError(f"unknown VM accelerator {setting!r}: use kvm, tcg or auto")
    if kvm_usable is None:
        kvm_usable = os.access(KVM, os.R_OK | os.W_OK)
    if choice == "tcg":
        return "tcg", "TCG was asked for"
    if choice == "kvm":
        if not kvm_usable:
            raise ValueError(f"KVM was asked for, but {KVM} is missing or not read/writable by this user")
        return "kvm", "KVM was asked for"
    if cpuinfo is None:
        try:
            cpuinfo = Path(CPUINFO).read_text()
        except OSError:
            cpuinfo = ""
    hardware = bool(_cpu_flags(cpuinfo) & {"vmx", "svm"})
    if hardware and kvm_usable:
        return "kvm", f"the CPU has vmx/svm and {KVM} is usable"
    if hardware:
        return "tcg", f"the CPU has vmx/svm but {KVM} is missing or not read/writable: TCG, software emulation"
    if kvm_usable:
        return "tcg", (
            f"{KVM} is present but the CPU has no vmx/svm: a software nested hypervisor, about 100x slower than TCG"
        )
    return "tcg", "the CPU has no vmx/svm: TCG, software emulation"
