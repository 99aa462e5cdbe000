/* A small Redis/Valkey module for portcullis's tests: a read command, a write command,
 * a blocking command and a config-style container, so the tests can check what the proxy
 * learns from a server's own COMMAND metadata and what its policy does with it.
 *
 *   testmod.read KEY            readonly            -> GET KEY
 *   testmod.write KEY VALUE     write deny-oom      -> SET KEY VALUE (replicated)
 *   testmod.block MS            readonly blocking   -> blocks MS ms, then +TIMEDOUT
 *   testmod.config SET|GET ...  container; SET is flagged "write", GET "readonly"
 *
 * Where the server has module ACL categories (Valkey, Redis >= 7.4), every command is
 * also in the category `testmod`.
 *
 * No redismodule.h: the few declarations needed are below, written for these tests
 * against the documented module API (functions are fetched by name at load time). */
#include <stddef.h>
#include <string.h>

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleCallReply RedisModuleCallReply;
typedef struct RedisModuleCommand RedisModuleCommand;
typedef struct RedisModuleBlockedClient RedisModuleBlockedClient;
typedef int (*CmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

#define OK 0
#define ERR 1
#define APIVER 1

static int (*GetApi)(const char *, void *);
static void (*SetModuleAttribs)(RedisModuleCtx *, const char *, int, int);
static int (*CreateCommand)(RedisModuleCtx *, const char *, CmdFunc, const char *, int, int, int);
static RedisModuleCommand *(*GetCommand)(RedisModuleCtx *, const char *);
static int (*CreateSubcommand)(RedisModuleCommand *, const char *, CmdFunc, const char *, int, int, int);
static int (*SetCommandACLCategories)(RedisModuleCommand *, const char *);
static int (*AddACLCategory)(RedisModuleCtx *, const char *);
static int (*ReplyWithSimpleString)(RedisModuleCtx *, const char *);
static int (*ReplyWithError)(RedisModuleCtx *, const char *);
static int (*WrongArity)(RedisModuleCtx *);
static RedisModuleCallReply *(*Call)(RedisModuleCtx *, const char *, const char *, ...);
static int (*ReplyWithCallReply)(RedisModuleCtx *, RedisModuleCallReply *);
static void (*FreeCallReply)(RedisModuleCallReply *);
static RedisModuleBlockedClient *(*BlockClient)(RedisModuleCtx *, CmdFunc, CmdFunc,
                                                 void (*)(RedisModuleCtx *, void *), long long);
static int (*StringToLongLong)(const RedisModuleString *, long long *);

#define API(var, name) \
    if (GetApi("RedisModule_" name, (void **)&var) != OK) var = NULL

static int forward(RedisModuleCtx *ctx, RedisModuleCallReply *r) {
    if (r == NULL) return ReplyWithError(ctx, "ERR testmod: call failed");
    ReplyWithCallReply(ctx, r);
    FreeCallReply(r);
    return OK;
}

static int cmd_read(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return WrongArity(ctx);
    return forward(ctx, Call(ctx, "GET", "s", argv[1]));
}

static int cmd_write(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3) return WrongArity(ctx);
    return forward(ctx, Call(ctx, "SET", "!ss", argv[1], argv[2]));
}

static int block_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    return ReplyWithSimpleString(ctx, "TIMEDOUT");
}

static int cmd_block(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    long long ms;
    if (argc != 2) return WrongArity(ctx);
    if (StringToLongLong(argv[1], &ms) != OK || ms <= 0)
        return ReplyWithError(ctx, "ERR testmod: timeout must be a positive integer");
    BlockClient(ctx, block_timeout, block_timeout, NULL, ms);
    return OK;
}

static int cmd_config_set(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (argc != 4) return WrongArity(ctx);
    return ReplyWithSimpleString(ctx, "OK");
}

static int cmd_config_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (argc != 3) return WrongArity(ctx);
    return ReplyWithSimpleString(ctx, "testmod-config-value");
}

static int categorize(RedisModuleCommand *cmd, const char *cats) {
    if (cmd == NULL) return ERR;
    if (SetCommandACLCategories == NULL || AddACLCategory == NULL) return OK;
    return SetCommandACLCategories(cmd, cats);
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    GetApi = (int (*)(const char *, void *))(unsigned long)((void **)ctx)[0];
    API(SetModuleAttribs, "SetModuleAttribs");
    API(CreateCommand, "CreateCommand");
    API(GetCommand, "GetCommand");
    API(CreateSubcommand, "CreateSubcommand");
    API(SetCommandACLCategories, "SetCommandACLCategories");
    API(AddACLCategory, "AddACLCategory");
    API(ReplyWithSimpleString, "ReplyWithSimpleString");
    API(ReplyWithError, "ReplyWithError");
    API(WrongArity, "WrongArity");
    API(Call, "Call");
    API(ReplyWithCallReply, "ReplyWithCallReply");
    API(FreeCallReply, "FreeCallReply");
    API(BlockClient, "BlockClient");
    API(StringToLongLong, "StringToLongLong");
    if (!SetModuleAttribs || !CreateCommand || !GetCommand || !CreateSubcommand ||
        !ReplyWithSimpleString || !ReplyWithError || !WrongArity || !Call ||
        !ReplyWithCallReply || !FreeCallReply || !BlockClient || !StringToLongLong)
        return ERR;
    SetModuleAttribs(ctx, "testmod", 1, APIVER);
    if (AddACLCategory != NULL && SetCommandACLCategories != NULL &&
        AddACLCategory(ctx, "testmod") != OK)
        return ERR;

    if (CreateCommand(ctx, "testmod.read", cmd_read, "readonly fast", 1, 1, 1) != OK) return ERR;
    if (CreateCommand(ctx, "testmod.write", cmd_write, "write deny-oom", 1, 1, 1) != OK) return ERR;
    if (CreateCommand(ctx, "testmod.block", cmd_block, "readonly blocking", 0, 0, 0) != OK)
        return ERR;
    if (CreateCommand(ctx, "testmod.config", NULL, "", 0, 0, 0) != OK) return ERR;
    RedisModuleCommand *config = GetCommand(ctx, "testmod.config");
    if (config == NULL) return ERR;
    if (CreateSubcommand(config, "set", cmd_config_set, "write", 0, 0, 0) != OK) return ERR;
    if (CreateSubcommand(config, "get", cmd_config_get, "readonly", 0, 0, 0) != OK) return ERR;

    if (categorize(GetCommand(ctx, "testmod.read"), "testmod read") != OK) return ERR;
    if (categorize(GetCommand(ctx, "testmod.write"), "testmod write") != OK) return ERR;
    if (categorize(GetCommand(ctx, "testmod.block"), "testmod") != OK) return ERR;
    if (categorize(GetCommand(ctx, "testmod.config|set"), "testmod") != OK) return ERR;
    if (categorize(GetCommand(ctx, "testmod.config|get"), "testmod") != OK) return ERR;
    return OK;
}
