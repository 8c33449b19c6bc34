"""agcnn as a DICOM network node (pynetdicom).

* :mod:`~agcnn.dicomnet.address` -- AE titles, ``AE@HOST:PORT`` destinations, sizes and TLS
  contexts, checked with errors that name the value;
* :mod:`~agcnn.dicomnet.send` -- ``agcnn send``: C-STORE of a folder of DICOM objects, with a
  journal so that a re-run sends only what was not accepted;
* :mod:`~agcnn.dicomnet.serve` -- ``agcnn serve``: a node that receives images, predicts them
  with :func:`agcnn.predict.predict` and sends the results back.
"""
