"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing input, unreachable cluster).

    The CLI prints `curate: error: <message>` and exits 2; the traceback is shown only
    with --debug.
    """


# The optional dependencies of `pip install 'curate[NAME]'` (pyproject.toml), by the module
# each brings: downloading and filtering need none of them.
EXTRAS = {
    "train": ("diffusers", "transformers", "accelerate", "peft", "pytorch_fid"),
    "s3": ("s3fs",),
}


def require_extra(extra: str, needed_by: str, modules: tuple[str, ...] | None = None, import_now: bool = True) -> None:
    """Raise a UserError naming the extra to install when a module it brings cannot be imported,
    e.g. "curate train needs curate's 'train' extra (diffusers is not installed): pip install
    'curate[train]'". `modules`: the ones `needed_by` imports (default: all of the extra's).
    `import_now=False` only looks for them (what a process that will not use them asks: `curate
    run` checking a filter's needs before its workers start; importing diffusers costs seconds)."""
    import importlib
    import importlib.util

    for module in modules or EXTRAS[extra]:
        try:
            if import_now:
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        except ImportError as exc:
            missing = exc.name == module if isinstance(exc, ModuleNotFoundError) else False
            why = f"{module} is not installed" if missing else f"{module} cannot be imported: {exc}"
            raise UserError(f"{needed_by} needs curate's {extra!r} extra ({why}): "
                            f"pip install 'curate[{extra}]'") from exc
