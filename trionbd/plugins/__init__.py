"""Built-in plugins, one module each. A module's docstring is its manual and its
``PLUGIN`` attribute is the plugin class."""
