"""The dashboard's widgets: layout in their ``DEFAULT_CSS``, colours in ``cortex.tcss``."""
