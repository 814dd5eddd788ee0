"""The bundled default's generator: captioned scenes with boxes, drawn offline.

Not part of the data contract (`cpfean.data`): real data goes through the region store and
the caption readers; these scenes exist because no captioned image set can be had offline.
``generate`` draws and writes the scenes, ``shapes`` draws the objects, ``templates`` writes
their captions.
"""
