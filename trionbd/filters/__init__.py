"""Built-in filters, one module each. A module's docstring is its manual and its
``FILTER`` attribute is the filter class."""
