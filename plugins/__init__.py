"""Built-in method plugins (each folder is one method, registered through the ``peftbench`` entry points)."""
