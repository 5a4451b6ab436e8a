"""Shared by the benchmark scripts: machine description, tables, process CPU time.

``machine_info`` and ``process_tree_cpu_s`` live in ``preemptserve.bench`` (the benchmark
harness uses them too); they are re-exported here for the scripts.
"""

from __future__ import annotations

from collections.abc import Sequence

from preemptserve.bench.report import machine_info
from preemptserve.bench.server import process_tree_cpu_s

__all__ = ["machine_info", "print_table", "process_tree_cpu_s"]


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], fmt: str
) -> None:
    if fmt == "markdown":
        print(f"\n**{title}**\n")
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    if fmt == "rich":
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            fmt = "plain"
        else:
            table = Table(title=title, title_justify="left")
            for i, header in enumerate(headers):
                table.add_column(header, justify="right" if i else "left")
            for row in rows:
                table.add_row(*row)
            Console(width=200).print(table)
            return
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    print(f"\n{title}")
    line = "  ".join(
        h.rjust(w) if i else h.ljust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
