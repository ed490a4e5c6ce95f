"""The built-in sinks, registered through the ``layerwatch.sinks`` entry points like any plugin."""
