"""Data: readers, label tables, splits, transforms, the preprocessing cache and generated phantoms.

=================  ==================================================================
``readers``        decode PNG / JPEG / DICOM into float [0, 1], bright = dense
``chestxray14``    NIH Data_Entry CSV, official split lists, CheXNet-style lists
``tables``         your own CSV export; patient-wise splitting
``transforms``     resize / crop / flip / normalise (paper Sec. 4.2), high-res copy
``datasets``       :class:`XrayDataset` and :func:`build_datasets` (from the config)
``cache``          decode-once memory-mapped cache written by ``agcnn prepare``
``synthetic``      generated chest phantoms with planted findings (``agcnn phantoms``)
=================  ==================================================================

Submodules are imported on use, so ``import agcnn.data`` stays light.
"""
