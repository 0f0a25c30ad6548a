"""segstudio's napari plugin (npe2): the Segment widget, sample data and a labels writer.

The manifest is ``napari.yaml`` in this package; napari imports the modules
it names only when a contribution is used.
"""
