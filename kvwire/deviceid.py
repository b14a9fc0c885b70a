"""device_uuid(): one GPU's name that two processes agree on, so a client finds the server's HBM pool device.

Ordinals are per process (CUDA_VISIBLE_DEVICES renumbers them), so the server publishes the
pool's device by UUID in DataPlane and the client looks its own ordinal up. Shared by both
sides, as host_id is; imports cupy only when called.
"""
from __future__ import annotations


def device_uuid(index: int) -> str:
    """The device's UUID as hex, or its PCI bus id where this CUDA does not report one."""
    from cupy.cuda import runtime

    uuid = runtime.getDeviceProperties(index).get("uuid", b"")
    if isinstance(uuid, str):
        uuid = uuid.encode("latin-1")
    if uuid:
        return "GPU-" + bytes(uuid).hex()
    return "pci-" + runtime.deviceGetPCIBusId(index).lower()


def device_ordinal(uuid: str) -> int | None:
    """This process's ordinal of the device named uuid, or None where it cannot see that device."""
    from cupy.cuda import runtime

    for index in range(runtime.getDeviceCount()):
        if device_uuid(index) == uuid:
            return index
    return None
