"""Image formats and protocol drivers.  Importing this package registers every driver."""
from engine.formats import file as _file  # noqa: F401
from engine.formats import raw as _raw  # noqa: F401
from engine.formats import qcow2 as _qcow2  # noqa: F401
from engine.formats import null as _null  # noqa: F401
from engine.formats import filters as _filters  # noqa: F401
from engine.formats import vdi as _vdi  # noqa: F401
from engine.formats import vpc as _vpc  # noqa: F401
