"""Smoke check of the harness: two matmul sizes, ratios printed. `python -m benchmarks.selfcheck`"""
from benchmarks.harness import bench, print_table


def setup_matmul(n: int):
    import torch

    a = torch.randn(n, n)
    return lambda: a @ a


if __name__ == "__main__":
    results = [bench("small", setup_matmul, 256), bench("large", setup_matmul, 512)]
    print_table("harness self-check", results, ours="small")
