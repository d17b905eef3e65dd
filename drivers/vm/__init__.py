"""The ``vm`` driver's machinery: each sandbox a QEMU microVM (``machine``), and the choice of
accelerator for it (``accel``).

A VM boots the guest that ``scripts/setup-vm.sh`` builds (Debian's cloud kernel and a busybox
initramfs) over three disks: the image's root filesystem (read-only, shared), the sandbox's
writable layer (an overlayfs upper) and its workspace. Nothing here is asynchronous: the driver
calls it from worker threads.
"""
