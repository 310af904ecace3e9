"""The ``probloss audit`` subcommand: audit a function named on the command line.

Usage::

    probloss audit TARGET [--domain NAME=KIND ...] [--reference TARGET]
                   [--dtype float32,float16,bfloat16,float64] [--seed N] [--json]

``TARGET`` is ``FILE.py:FUNCTION`` (a path; a file inside a package is imported as
``package.module``, so its relative imports work) or ``MODULE:FUNCTION`` (imported), e.g.
``probloss audit probloss/audit/naive.py:naive_cb_mean``. ``KIND`` is a
:class:`~probloss.audit.domains.Domain` string: ``real``, ``logit``, ``positive``,
``nonnegative``, ``unit``, ``correlation``, optionally with bounds (``real[-100,100]``).
Arguments not named are ``real``; parameters with defaults are audited only when named.

Exit status: 0 when nothing failed, 1 when something did, 2 on a usage error (bad file,
missing function, bad domain, unknown dtype, bad ``--reference``, a function that is not
elementwise or fails on typical inputs), with a one-line message on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .domains import AuditUsageError, Domain
from .runner import DEFAULT_DTYPES, audit

USAGE = (
    "probloss audit TARGET [--domain NAME=KIND ...] [--reference TARGET] "
    "[--dtype float32,float16,bfloat16,float64] [--seed N] [--json]"
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _package_root(path: Path) -> tuple[Path, str]:
    """The directory above the outermost package holding ``path``, and its dotted name."""
    parts, parent = [path.stem], path.parent
    while (parent / "__init__.py").is_file():
        parts.insert(0, parent.name)
        parent = parent.parent
    return parent, ".".join(parts)


def _load_file(path: Path) -> object:
    """Import ``path``: as ``package.module`` inside a package (relative imports work), else
    as a standalone module; its root directory is on ``sys.path`` while it loads."""
    if not path.is_file():
        raise AuditUsageError(f"no such file: {path}")
    root, dotted = _package_root(path.resolve())
    sys.path.insert(0, str(root))
    try:
        if "." in dotted:
            return importlib.import_module(dotted)
        name = f"_probloss_audit_{dotted}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise AuditUsageError(f"cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    except AuditUsageError:
        raise
    except (Exception, SystemExit) as err:
        raise AuditUsageError(f"loading {path} failed: {_first_line(err)}") from None
    finally:
        sys.path.remove(str(root))


def load_function(target: str) -> Callable:
    """The function named by ``FILE.py:FUNCTION`` or ``MODULE:FUNCTION``.

    Raises:
        AuditUsageError: malformed target, missing file or module, missing or
            non-callable attribute, or an error while loading.

    Example:
        >>> load_function("probloss.audit.naive:stable_cb_mean").__name__
        'stable_cb_mean'
    """
    where, sep, attribute = target.rpartition(":")
    if not sep or not where or not attribute:
        raise AuditUsageError(f"expected FILE.py:FUNCTION or MODULE:FUNCTION, got {target!r}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _load_file(Path(where))
    else:
        try:
            module = importlib.import_module(where)
        except (Exception, SystemExit) as err:
            raise AuditUsageError(f"cannot import {where}: {_first_line(err)}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise AuditUsageError(f"{where} has no function {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise AuditUsageError(f"{where}:{attribute} is not callable")
    return obj


def parse_domain_options(items: list[str]) -> dict[str, Domain]:
    """``["rho=correlation", "x=real[-1,1]"]`` as ``{name: Domain}``; a name given twice fails.

    Example:
        >>> parse_domain_options(["rho=correlation", "x=real[-1,1]"])
        {'rho': Domain('correlation'), 'x': Domain('real[-1,1]')}
    """
    domains: dict[str, Domain] = {}
    for item in items:
        name, sep, kind = item.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise AuditUsageError(
                f"bad --domain {item!r}: expected NAME=KIND, e.g. rho=correlation"
            )
        if name in domains:
            raise AuditUsageError(f"--domain {name} given twice")
        domains[name] = Domain.parse(kind)
    return domains


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``audit`` on the ``probloss`` subcommand parsers; returns its parser."""
    parser = subparsers.add_parser(
        "audit",
        help="find where a loss function's value or gradient is non-finite or wrong",
        description="Run a function over hard inputs (0, tiny, huge, saturation points, "
        "domain boundaries) in every dtype, with its gradient, and compare with float64. "
        "Exit status: 0 no failure, 1 failures, 2 usage error.",
        usage=USAGE,
    )
    parser.add_argument("target", metavar="TARGET", help="FILE.py:FUNCTION or MODULE:FUNCTION")
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        metavar="NAME=KIND",
        help="domain of an argument: real, logit, positive, nonnegative, unit, correlation, "
        "optionally bounded as real[-100,100] (default: real; repeatable)",
    )
    parser.add_argument(
        "--reference",
        metavar="TARGET",
        help="trusted function with the same arguments, evaluated in float64 "
        "(default: the function itself in float64)",
    )
    parser.add_argument(
        "--dtype",
        default=",".join(DEFAULT_DTYPES),
        metavar="LIST",
        help=f"comma-separated dtypes (default: {','.join(DEFAULT_DTYPES)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the audit for parsed arguments; print the report; return the exit status."""
    try:
        fn = load_function(args.target)
        try:
            reference = None if args.reference is None else load_function(args.reference)
        except AuditUsageError as err:
            raise AuditUsageError(f"bad --reference: {err}") from None
        domains = parse_domain_options(args.domain)
        dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
        report = audit(fn, domains, reference, dtypes, seed=args.seed)
    except AuditUsageError as err:
        print(f"probloss audit: error: {err}", file=sys.stderr)
        return 2
    try:
        print(report.to_json() if args.json else report, flush=True)
    except BrokenPipeError:  # e.g. piped into head: the reader is gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0 if report.ok else 1
