"""Hub remote-code files of GenieBlue (shipped flat to the Hub; packaged here as ``genieblue_hf.modeling``)."""
