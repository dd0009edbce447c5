"""python -m tltorch [info|check|demo]

info   print what this installation can run on (backend_info)
check  (the default) print backend_info, check tltorch's linear (forward and gradients) against torch
       in float64 on every available device, and time it against torch.nn.functional.linear
demo   train a classifier on a pretrained sentence encoder five ways (the body re-run every epoch,
       extract_features + fit_head, LoRA, ULMFiT, a distilled student) and compare accuracy and time;
       `demo --help` for its options
"""
import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import tltorch


def _median_time(fn, repeat=7):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(device: str) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4, 33, 768, generator=g).to(device).requires_grad_()
    w = (torch.randn(1000, 768, generator=g) / 768 ** 0.5).to(device).requires_grad_()
    b = torch.randn(1000, generator=g).to(device).requires_grad_()
    y = tltorch.functional.linear(x, w, b)
    dy = torch.randn(y.shape, generator=g).to(device)
    y.backward(dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = F.linear(xd, wd, bd)
    yd.backward(dy.double())
    errs = {
        "y": (y.double() - yd).abs().max().item() / yd.abs().max().item(),
        "dx": (x.grad.double() - xd.grad).abs().max().item() / xd.grad.abs().max().item(),
        "dweight": (w.grad.double() - wd.grad).abs().max().item() / wd.grad.abs().max().item(),
        "dbias": (b.grad.double() - bd.grad).abs().max().item() / bd.grad.abs().max().item(),
    }
    ok = all(e < 1e-5 for e in errs.values())
    print(f"[{device}] linear forward+backward vs float64 torch, max relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ("  OK" if ok else "  FAILED"))

    xs = torch.randn(2048, 768, generator=g).to(device)
    ws = (torch.randn(3072, 768, generator=g) / 768 ** 0.5).to(device)
    with torch.no_grad():
        t_tl = _median_time(lambda: tltorch.functional.linear(xs, ws))
        t_torch = _median_time(lambda: F.linear(xs, ws))
    flop = 2 * 2048 * 768 * 3072
    print(f"[{device}] linear 2048 x 768 -> 3072 float32: tltorch {flop / t_tl / 1e9:.1f} GFLOP/s, "
          f"torch {flop / t_torch / 1e9:.1f} GFLOP/s, ratio {t_torch / t_tl:.2f}x")
    return ok


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:
        from . import demo
        return demo.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m tltorch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="check", choices=["info", "check", "demo"])
    args = p.parse_args(argv)
    info = tltorch.backend_info()
    print("tltorch backend_info:")
    for k, v in info.items():
        print(f"  {k}: {v}")
    if args.command == "info":
        return 0
    ok = check("cpu")
    if info["cuda_available"]:
        ok = check("cuda") and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
