import sys

from agcnn.cli import main

sys.exit(main())
