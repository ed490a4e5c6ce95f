"""From change to durable event to sink: events, the publisher, intake, the spool,
sink runners, the sink contract and plugins, the built-in sinks.

Imports only ``watcher.core``.
"""
