"""What the report-page tests share beside their fixtures (a module name of its own, so a test file
can import it whatever other ``conftest`` pytest loaded last)."""

# A file name with markup in it: the page must show it as text.
MARKUP_NAME = "<img src=x onerror=alert(1)>&.dcm"
