"""Components from the user's own files: a config's ``type`` spelled ``"module:Name"``
(``"examples.segmentation:UNet"``) names ``Name`` in the module ``module``, imported as Python imports it (from
the project folder, which holds the entry points). It works in every section that builds a component: ``arch``, ``data_loader``, ``loss``, ``metrics``,
``optimizer``, ``lr_scheduler``, ``task``. Imported only when a config uses such a name.
"""

import importlib

from utils.errors import ConfigError, did_you_mean


def imported(spec, where):
    """The object ``spec`` ("module:Name") names; a ConfigError of one line when the module or name is not there, or
    importing the module fails."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name.isidentifier():
        raise ConfigError(f'{where}: {spec!r} is not of the form "module:Name" (such as "examples.segmentation:UNet")')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the module itself (or a package above it) is missing
            path = module_name.replace(".", "/") + ".py"
            raise ConfigError(f"{where}: no module {module_name!r} to import {name} from (a file {path} under the"
                              " project folder)") from None
        raise ConfigError(f"{where}: importing {module_name} failed: {err}") from None
    except Exception as err:  # the user's module is broken: its error, in one line
        raise ConfigError(f"{where}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    if not hasattr(module, name):
        public = [n for n in vars(module) if not n.startswith("_")]
        raise ConfigError(f"{where}: module {module_name} has no {name!r}{did_you_mean(name, public)}")
    return getattr(module, name)
