from femtocc.cli import main
import sys
sys.exit(main())
