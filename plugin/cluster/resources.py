"""Which Ray resource stands for which accelserve device, so Ray starts a replica only where its device is.

A real GPU is Ray's own `GPU` (Ray detects it and sets CUDA_VISIBLE_DEVICES for the replica). Everything
else is a custom resource, one per device class, so an emulated or simulated device is never counted as
the hardware it stands in for:

    accelserve_npu            a real NPU
    accelserve_npu_emulated   a vendor's NPU runtime emulated on the CPU (QNN HTP on x86-64)
    accelserve_sim_gpu        a simulated GPU (torch on the CPU)
    accelserve_sim_npu        a simulated NPU (onnxruntime-genai on the CPU)
    accelserve_cpu            the CPU, advertised only on nodes that should serve from it

Run `python -m plugin.cluster.resources` on a node (with its ACCELSERVE_SIMULATE, if any) to print the
`--resources` JSON for `ray start`. No Ray import here.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from plugin.engine.devices import DeviceInfo, discover_devices

PREFIX = "accelserve_"


@dataclass(frozen=True)
class DeviceClass:
    """One deployment per class: its replicas all hold the same kind of device, labelled the same way."""

    name: str  # deployment name and resource suffix: "gpu", "npu", "npu_emulated", "sim_gpu", "sim_npu", "cpu"
    kind: str  # the device kind the replica's Engine is pinned to: "gpu" | "npu" | "cpu"
    resource: str  # the Ray resource one replica takes one unit of

    @property
    def label(self) -> str:
        """How the class executes, in the project's honest labels."""
        if self.name.startswith("sim_"):
            return "simulated, runs on the CPU"
        if self.name.endswith("_emulated"):
            return "emulated on the CPU"
        return "real hardware"


CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("gpu", "gpu", "GPU"),
        DeviceClass("npu", "npu", PREFIX + "npu"),
        DeviceClass("npu_emulated", "npu", PREFIX + "npu_emulated"),
        DeviceClass("sim_gpu", "gpu", PREFIX + "sim_gpu"),
        DeviceClass("sim_npu", "npu", PREFIX + "sim_npu"),
        DeviceClass("cpu", "cpu", PREFIX + "cpu"),
    )
}
BY_RESOURCE = {c.resource: c for c in CLASSES.values()}


def device_class(device: DeviceInfo) -> DeviceClass:
    """The class of one discovered device."""
    if device.kind == "cpu":
        return CLASSES["cpu"]
    if device.simulated:
        return CLASSES[f"sim_{device.kind}"]
    if device.emulated:
        return CLASSES[f"{device.kind}_emulated"]
    return CLASSES[device.kind]


def node_resources(devices: Sequence[DeviceInfo], serve_cpu: bool | None = None) -> dict[str, float]:
    """Custom resources this node advertises. Ray detects real GPUs itself, so `GPU` is left out.

    The CPU is advertised when `serve_cpu` says so; by default only on a node without any accelerator
    (a plain CPU node), since on an accelerator node the CPU is busy feeding the accelerator."""
    counts = Counter(device_class(d) for d in devices if d.kind != "cpu")
    if serve_cpu is None:
        serve_cpu = not counts
    out = {c.resource: float(n) for c, n in counts.items() if c.resource != "GPU"}
    if serve_cpu:
        out[CLASSES["cpu"].resource] = 1.0
    return dict(sorted(out.items()))


def cluster_classes(cluster_resources: dict[str, float]) -> dict[str, int]:
    """{class name: how many devices of it the cluster has}, from `ray.cluster_resources()`."""
    out = {}
    for resource, amount in cluster_resources.items():
        cls = BY_RESOURCE.get(resource)
        if cls is not None and int(amount) >= 1:
            out[cls.name] = int(amount)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plugin.cluster.resources",
        description="Print this node's accelserve devices as the --resources JSON of `ray start`.",
    )
    cpu = parser.add_mutually_exclusive_group()
    cpu.add_argument("--cpu", action="store_true", help="also serve from this node's CPU")
    cpu.add_argument("--no-cpu", action="store_true", help="never serve from this node's CPU")
    args = parser.parse_args(argv)
    serve_cpu = True if args.cpu else False if args.no_cpu else None
    print(json.dumps(node_resources(discover_devices(), serve_cpu)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
