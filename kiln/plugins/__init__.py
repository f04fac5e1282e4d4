"""Plugins: registered custom ops with a fast forward, a plain-torch reference and a fake."""

from kiln.plugins.registry import (
    DEFAULT_PLUGINS,
    FORWARD_DEFAULT_PLUGINS,
    Plugin,
    PluginSet,
    get_plugin,
    plugin,
    registered_plugins,
)

__all__ = [
    "DEFAULT_PLUGINS",
    "FORWARD_DEFAULT_PLUGINS",
    "Plugin",
    "PluginSet",
    "get_plugin",
    "plugin",
    "registered_plugins",
]
