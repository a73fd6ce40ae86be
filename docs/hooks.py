"""MkDocs hook: stand-in pages for documents that other parts of the project generate.

``docs/gpu_checks.md`` (the CUDA checks, written by ``scripts/gpu_checks.py`` on a GPU machine)
and ``docs/performance.md`` (the benchmark tables) are produced and committed separately. Until
they exist, the navigation and the links to them would break the strict build; this hook adds a
short virtual page in their place, never a file on disk, and steps aside once the real page is
there. Every other broken link still fails the build.
"""

from __future__ import annotations

from mkdocs.structure.files import File, Files

PENDING = {
    "gpu_checks.md": (
        "GPU checks",
        "The CUDA checks (DDP with NCCL, FSDP, DeepSpeed ZeRO stage 2 and 3, fp16 AMP against the "
        "hand-written reference) are run with `python scripts/gpu_checks.py --out docs/gpu_checks.md` on a "
        "machine with a GPU. Their recorded output has not been committed to this checkout yet.",
    ),
    "performance.md": (
        "Performance",
        "The benchmark tables (time and memory of every regulariser, dense and chunked paths, large "
        "classifiers) are produced by the scripts in `benchmarks/`. They have not been committed to this "
        "checkout yet.",
    ),
}


def on_files(files: Files, config) -> Files:
    for name, (title, text) in PENDING.items():
        if files.get_file_from_path(name) is None:
            files.append(
                File.generated(config, name, content=f'# {title}\n\n!!! note "Not recorded yet"\n    {text}\n')
            )
    return files
