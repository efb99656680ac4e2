"""Building, publishing and loading indexes. Import the stage modules directly (index.build, index.load, ...);
build pulls in torch and the encoder, which a process that only serves a prebuilt index may not want at import."""
